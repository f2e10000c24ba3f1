"""Run every benchmark and print one table of ratios (variant / baseline).

    python benchmarks/run_all.py --quick          # CPU: < 2 min; CUDA: a few minutes
    python benchmarks/run_all.py --json out.json  # also write the rows as JSON

On a CUDA machine it measures in bf16 with torch's fused AdamW as the honest baseline, on the 1.1B
Llama shape and the SmolLM2-135M shape (built from configs: no assets needed). On a CPU it measures
in fp32 with one torch thread and process CPU time, on a scaled-down Llama shape (and, without
``--quick``, the shipped SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The CPU peak-memory probe (torch profiler) makes c10 log "[W ... CPUAllocator.cpp] Memory block of unknown size
# was allocated before the profiling started": expected there, noise to a reader. Read once, when torch loads;
# C++ errors still print, Python warnings (e.g. a failed torch.compile) are not affected.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


import bench_das_step  # noqa: E402
import bench_importance  # noqa: E402
import bench_optimizer  # noqa: E402
import bench_softmask_step  # noqa: E402
import bench_tss_layer  # noqa: E402
from common import Env, Row, make_env  # noqa: E402

BENCHES = ("optimizer", "step", "das", "importance", "tss")


def plan(env: Env) -> list[tuple[str, callable]]:
    """(bench name, thunk returning rows) for this device and mode."""
    if env.cuda:
        big, small = "llama-1.1b", "smollm2-135m"
        jobs = [
            ("optimizer", lambda: bench_optimizer.run(env, big)),
            ("step", lambda: bench_softmask_step.run(env, big, 4, 1024)),
            ("step", lambda: bench_softmask_step.run(env, small, 8, 1024)),
            ("das", lambda: bench_das_step.run(env, small, 8, 512)),
            ("importance", lambda: bench_importance.run(env, small, 8, 1024)),
            ("tss", lambda: bench_tss_layer.run(env, 2048, 5632, 8192)),
        ]
        if not env.quick:
            jobs.insert(4, ("das", lambda: bench_das_step.run(env, big, 2, 1024)))
            jobs.insert(6, ("importance", lambda: bench_importance.run(env, big, 4, 1024)))
        return jobs
    mini = "llama-cpu-mini"
    jobs = [
        ("optimizer", lambda: bench_optimizer.run(env, mini)),
        ("step", lambda: bench_softmask_step.run(env, mini, 2, 128)),
        ("das", lambda: bench_das_step.run(env, mini, 4, 64)),
        ("importance", lambda: bench_importance.run(env, mini, 2, 128)),
        ("tss", lambda: bench_tss_layer.run(env, 384, 1056, 512)),
    ]
    if not env.quick:
        # the optimizer step at a real model's size, where its fixed per-step host cost is a small share
        jobs.insert(1, ("optimizer", lambda: bench_optimizer.run(env, "smollm2-135m")))
        jobs.insert(3, ("step", lambda: bench_softmask_step.run(env, "smollm2-135m", 1, 128)))
    return jobs


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "tok/s":
        return f"{v:,.0f}"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def table(rows: list[Row]) -> str:
    head = [
        "bench",
        "model",
        "variant",
        "baseline",
        "variant",
        "baseline",
        "unit",
        "ratio",
        "target",
        "",
        "mem",
        "note",
    ]
    body = [
        [
            r.bench,
            r.model,
            r.variant,
            r.baseline,
            _fmt(r.value, r.unit),
            _fmt(r.base_value, r.unit),
            r.unit,
            "-" if math.isnan(r.ratio) else f"{r.ratio:.3f}x",
            r.target,
            r.verdict(),
            "-" if r.mem_ratio is None else f"{r.mem_ratio:.2f}x",
            r.note,
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; on a CPU only the scaled-down shapes")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on a CPU (default 1: CPU-time clock is exact)"
    )
    parser.add_argument("--only", nargs="*", choices=BENCHES, help="run only these benchmarks")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)

    env = make_env(args.device, quick=args.quick, threads=args.threads)
    start = time.time()
    print(f"# hf_softmask benchmarks on {env.describe()}{' (quick)' if env.quick else ''}", flush=True)
    if not env.cuda:
        print(
            "# CPU timings are process CPU time (robust to other jobs, not to memory-bandwidth contention)", flush=True
        )
    rows: list[Row] = []
    failed = 0
    for name, job in plan(env):
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        try:
            got = job()
        except Exception as err:  # one failing benchmark must not hide the others' numbers
            failed += 1
            traceback.print_exc()
            got = [
                Row(name, "-", "FAILED", "-", float("nan"), float("nan"), note=f"{type(err).__name__}: {err}"[:120])
            ]
        rows.extend(got)
        print(f"#   {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    print(f"# total {time.time() - start:.0f} s")
    if args.json:
        payload = {
            "device": env.describe(),
            "quick": env.quick,
            "date": time.strftime("%Y-%m-%d"),
            "rows": [r.as_dict() for r in rows],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
