"""What one run of the CPU study costs, by stage, and whether two runs side by side at one thread each beat one at
a time at two threads (the machine has 2 cores).

Runs the study config's settings (``configs/experiments/cpu_study.yaml``) for one row (``--strategy``, ``--lr``,
seed 0) three times: alone at 2 threads, then two copies (seeds 0 and 1) side by side at 1 thread each, in
subprocesses, and prints the runner's own wall time by stage (``stage_seconds_total`` in results.json) and the
throughput ratio. Also times the evaluation alone at two evaluation batch sizes. Run it on a quiet machine:

    python benchmarks/bench_study_cost.py [--strategy das] [--lr 1.4142e-4] [--max_steps 16]
    python benchmarks/bench_study_cost.py --quick     # only the threads question, on the bare work (~2 min)
    python benchmarks/bench_study_cost.py --eval_batching   # only the evaluation at batch 8 vs 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "experiments" / "cpu_study.yaml"


def _run(out: Path, strategy: str, lr: float, seed: int, threads: int, steps: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "continual_pretrain.py"),
        "--config",
        str(CONFIG),
        "--runs",
        "[]",
        "--seeds",
        "",
        "--primary_comparison",
        "",
        "--control_run",
        "",
        "--strategy",
        strategy,
        "--learning_rate",
        str(lr),
        "--seed",
        str(seed),
        "--split_seed",
        "42",
        "--max_steps",
        str(steps),
        "--num_threads",
        str(threads),
        "--plots",
        "false",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, out: Path) -> dict:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"run into {out} failed:\n{err[-3000:]}")
    return json.loads((out / "results.json").read_text())["stage_seconds_total"]


def _eval_seconds(batch_sizes: list[int]) -> dict[int, float]:
    """Evaluation of the study's held-out sets (3 topics + general text) with the base model, per batch size."""
    import torch

    from hf_softmask.continual import parse_config
    from hf_softmask.continual.model_loading import load_model_and_tokenizer, resolve_model_path
    from hf_softmask.continual.pretraining.data import PretrainingData
    from hf_softmask.evaluation.bootstrap import block_losses

    torch.set_num_threads(2)
    out = {}
    for bs in batch_sizes:
        args = parse_config(
            ["--config", str(CONFIG), "--per_device_eval_batch_size", str(bs), "--output_dir", tempfile.mkdtemp()]
        )
        model, tok, mlm = load_model_and_tokenizer(resolve_model_path(args.model_name_or_path), args.objective)
        data = PretrainingData(args, tok, mlm)
        t0 = time.perf_counter()
        for ev in [*data.eval, data.general_eval]:
            block_losses(model, ev, causal=True)
        out[bs] = time.perf_counter() - t0
    return out


def _work(threads: int, steps: int) -> float:
    """Seconds for ``steps`` AdamW steps of SmolLM2 on 4 x 64-token blocks plus one evaluation of 80 held-out
    blocks: the study's two kinds of work, in the proportion of one domain."""
    import torch

    from hf_softmask.continual.model_loading import load_model_and_tokenizer, resolve_model_path

    torch.set_num_threads(threads)
    model, _, _ = load_model_and_tokenizer(resolve_model_path("smollm2"), "clm")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 49152, (4, 64), generator=g)
    held_out = torch.randint(0, 49152, (80, 64), generator=g)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for i in range(0, 80, 32):
            model(input_ids=held_out[i : i + 32]).logits.float().sum()
    return time.perf_counter() - t0


def quick(steps: int) -> None:
    """One worker at 2 threads, then two side by side at 1 thread each (subprocesses); throughput ratio."""

    def spawn(threads):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, __file__, "--worker", str(threads), "--steps", str(steps)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)

    alone = float(spawn(2).communicate()[0].split()[-1])
    pair = [spawn(1), spawn(1)]
    both = [float(p.communicate()[0].split()[-1]) for p in pair]
    print(f"{steps} SmolLM2 train steps (4 x 64 tokens) + evaluation of 80 blocks:")
    print(
        f"  one process, 2 threads: {alone:.1f} s; two processes side by side, 1 thread each: "
        f"{both[0]:.1f} s and {both[1]:.1f} s"
    )
    print(f"  throughput two-side-by-side / one-at-2-threads: {2 * alone / max(both):.2f}x")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="das")
    p.add_argument("--lr", type=float, default=1.4142e-4)
    p.add_argument("--max_steps", type=int, default=16)
    p.add_argument("--skip_eval_batching", action="store_true")
    p.add_argument("--quick", action="store_true", help="only the 2x1-thread vs 1x2-thread throughput of the work")
    p.add_argument("--steps", type=int, default=8, help="train steps of --quick")
    p.add_argument("--eval_batching", action="store_true", help="only the evaluation at batch 8 vs 32")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        print(_work(a.worker, a.steps))
        return
    if a.quick:
        quick(a.steps)
        return
    if a.eval_batching:
        _print_eval_batching()
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        alone = _finish(_run(tmp / "alone", a.strategy, a.lr, 0, 2, a.max_steps), tmp / "alone")
        t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        procs = [_run(tmp / f"pair{s}", a.strategy, a.lr, s, 1, a.max_steps) for s in (0, 1)]
        pair = [_finish(p, tmp / f"pair{s}") for s, p in zip((0, 1), procs)]
        t_pair = time.perf_counter() - t0
    print(f"one run ({a.strategy}, lr {a.lr:g}, {a.max_steps} steps/domain), 2 threads: {t_alone:.0f} s wall")
    print("  by stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in alone.items()))
    print(f"two runs side by side, 1 thread each: {t_pair:.0f} s wall for both")
    for s, st in zip((0, 1), pair):
        print(f"  seed {s} by stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in st.items()))
    print(
        f"runs per hour: {3600 / t_alone:.1f} one at a time vs {7200 / t_pair:.1f} two side by side "
        f"(ratio {2 * t_alone / t_pair:.2f}x)"
    )
    if not a.skip_eval_batching:
        _print_eval_batching()


def _print_eval_batching() -> None:
    ev = _eval_seconds([8, 32])
    print(
        "evaluation of the held-out sets, 2 threads: "
        + ", ".join(f"batch {k}: {v:.1f} s" for k, v in ev.items())
        + f" (batch 8 / batch 32: {ev[8] / ev[32]:.2f}x)"
    )


if __name__ == "__main__":
    main()
