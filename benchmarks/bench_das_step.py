"""The DAS training step (LM loss + contrastive integration, update-mode soft-masking) against a plain step.

Driven through ``DASStrategy``'s own hooks (``on_train_begin``, ``forward_kwargs``, ``extra_loss``), as
``StrategyTrainer`` drives it: the LM forward's hidden states give z1, then z2 (second dropout view) and z3
(importance-gated view) run as ONE batched forward of the same weights (no teacher copy), with or without
autograd (``view_gradients``). Reports step time and peak memory, each as a ratio to the plain step.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the torch profiler's allocation events of one
step (peak of the live bytes it allocated) plus the bytes held across steps (parameters, optimizer state), the
same quantity. Run alone::

    python benchmarks/bench_das_step.py                      # CPU: llama-cpu-mini, batch 4 x 64
    python benchmarks/bench_das_step.py --shape smollm2-135m --batch 8 --seq 512   # a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_softmask_step import blocks
from common import (
    Env,
    Row,
    free,
    llama_model,
    lm_batch,
    make_env,
    random_importance,
    ratio_of_peaks,
    smollm2_model,
)


def cpu_step_peak_bytes(step, tensors_held) -> int:
    """Peak bytes live during one call of ``step`` on a CPU: profiler allocation events + ``tensors_held``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.events() if e.name == "[memory]" or e.self_cpu_memory_usage]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        # "[memory]" events are allocations/frees outside an operator (e.g. a tensor dropped by Python).
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    held = sum(t.numel() * t.element_size() for t in tensors_held)
    return held + peak


def run(env: Env, shape: str, batch_size: int, seq_len: int, checkpointing: bool = False) -> list[Row]:
    from hf_softmask.core.contrastive import _pooled_views, info_nce
    from hf_softmask.strategies.das import DASStrategy

    model = smollm2_model(env) if shape == "smollm2-135m" else llama_model(shape, env)
    model.train()
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = lm_batch(model.config.vocab_size, batch_size, seq_len, env.device)
    importance = random_importance(model)
    strategies = {g: DASStrategy(show_progress=False, view_gradients=g) for g in (True, False)}
    strategies["mask"] = DASStrategy(show_progress=False, contrastive_weight=0.0)  # soft-masking alone
    for s in strategies.values():
        s.importance = importance
    opts = {
        k: torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True) for k in ("plain", True, False, "v1", "mask")
    }

    def finish(loss, opt):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain_step():
        finish(model(**batch).loss, opts["plain"])

    def das_step(key):
        strategy = strategies[key]
        out = model(**batch, **strategy.forward_kwargs(model, batch))
        extra = strategy.extra_loss(model, batch, out)
        finish(out.loss if extra is None else out.loss + extra, opts[key])

    das = strategies[True]
    layout = das.layout(model)

    def v1_step():
        # Reference: the views as before batching (z2 and z3 as two forwards, both with autograd).
        out = model(**batch, **das.forward_kwargs(model, batch))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        z1 = (out.hidden_states[-1] * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        site = das.cfg.ffn_gate_site
        (z2,) = _pooled_views(model, ids, mask, layout, das._view_dropout, 1, None, site)
        (z3,) = _pooled_views(model, ids, mask, layout, das._view_dropout, 0, importance, site)
        finish(out.loss + info_nce(z1, z2, z3, das.cfg.temperature), opts["v1"])

    def attach(key):
        return (
            (lambda: strategies[key].on_train_begin(model, opts[key]))
            if key in strategies
            else (lambda: das.on_train_begin(model, opts[key]))
        )

    def detach(key):
        return (
            (lambda: strategies[key].on_train_end(model, opts[key]))
            if key in strategies
            else (lambda: das.on_train_end(model, opts[key]))
        )

    def nothing():
        return None

    variants = {
        "plain": (nothing, plain_step, nothing),
        "LM + soft-mask (update), no contrast": (attach("mask"), lambda: das_step("mask"), detach("mask")),
        "DAS, views with grad": (attach(True), lambda: das_step(True), detach(True)),
        "DAS, stop-grad views": (attach(False), lambda: das_step(False), detach(False)),
        "DAS v1 (unbatched views with grad)": (attach("v1"), v1_step, detach("v1")),
    }
    warmup, rounds, iters = (1, 2, 2) if env.quick else (2, 3, 5)
    t = blocks(variants, env, warmup, rounds, iters)
    peaks = {name: t[name][2] for name in variants}
    if not env.cuda:
        opt_of = dict(zip(variants, ("plain", "mask", True, False, "v1")))
        for name, (att, step, det) in variants.items():
            att()
            held = list(model.parameters()) + [
                v for st in opts[opt_of[name]].state.values() for v in st.values() if torch.is_tensor(v)
            ]
            peaks[name] = cpu_step_peak_bytes(step, held)
            det()
    base_ms = t["plain"][0]
    tag = f"batch {batch_size}x{seq_len}" + (", grad ckpt" if checkpointing else "")
    notes = {
        "LM + soft-mask (update), no contrast": "attribution: the masked optimizer step's own share",
        "DAS, views with grad": "LM fwd (z1) + 1 batched views fwd (z2,z3) + backward through both",
        "DAS, stop-grad views": "LM fwd (z1) + 1 batched no-grad views fwd",
        "DAS v1 (unbatched views with grad)": "before batching: 3 forwards + backward",
    }
    rows = []
    for name, note in notes.items():
        default = name == ("DAS, views with grad" if DASStrategy().cfg.view_gradients else "DAS, stop-grad views")
        rows.append(
            Row(
                "DAS step",
                shape,
                name + (" [default]" if default else ""),
                "plain",
                t[name][0],
                base_ms,
                target="<=2.0x,mem<=1.3x" if default else "",
                mem_ratio=ratio_of_peaks(peaks[name], peaks["plain"]),
                note=f"{tag}; {note}",
            )
        )
    free(model, opts, strategies)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument(
        "--shape",
        default=None,
        help="llama shape from common.SHAPES (default: llama-cpu-mini on a CPU, smollm2-135m on a GPU)",
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    env = make_env(args.device, quick=args.quick, threads=args.threads)
    shape = args.shape or ("smollm2-135m" if env.cuda else "llama-cpu-mini")
    batch = args.batch or (8 if env.cuda else 4)
    seq = args.seq or (512 if env.cuda else 64)
    from run_all import table

    print(f"# DAS step on {env.describe()}")
    print(table(run(env, shape, batch, seq, args.gradient_checkpointing)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
