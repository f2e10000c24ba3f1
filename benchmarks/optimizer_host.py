"""Host time of the masked fused AdamW step against torch's fused AdamW, the update kernels replaced by no-ops.

What is left of a step when its kernel does nothing is the Python and dispatch around it: hooks, gathering tensors,
folding scalars, guard checks. Each timed step follows a foreach AdamW step over the same parameters, which streams
the caches cold as a backward pass or the update itself would. A diagnostic, not a target: run_all.py times the
whole steps. ``python benchmarks/optimizer_host.py [--shape llama-cpu-mini] [--rounds 40]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import llama_model, make_env, random_importance

from hf_softmask.core import optim
from hf_softmask.core.layout import UnitLayout
from hf_softmask.core.masking import SoftMaskConfig, build_param_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-cpu-mini")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    env = make_env("cpu", quick=True, threads=1)
    model = llama_model(args.shape, env)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    masks = build_param_masks(UnitLayout.from_model(model), random_importance(model), SoftMaskConfig())
    flush = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    torch_fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    masked = torch.optim.AdamW(params, lr=1e-4, fused=True)
    optim.install_update_masks(masked, masks, compiled=True)
    masked.step()  # compiles, and builds the step plan
    torch_fused.step()
    # the kernels out: torch's fused AdamW kernel and the compiled masked update
    real_kernel, real_update = torch._fused_adamw_, optim._COMPILED_UPDATE
    torch._fused_adamw_ = lambda *a, **k: None
    optim._COMPILED_UPDATE = lambda *a: None
    try:
        times: dict[str, list[float]] = {"torch fused AdamW": [], "masked fused AdamW (compiled)": []}
        for _ in range(args.rounds):
            for name, step in zip(times, (torch_fused.step, masked.step)):
                flush.step()
                t0 = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch._fused_adamw_, optim._COMPILED_UPDATE = real_kernel, real_update
    n = len(params)
    print(f"# host time per step without the update kernel, {args.shape} ({n} tensors), after a cache-cold step")
    base = statistics.median(times["torch fused AdamW"])
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"{name:32s} {ms:6.3f} ms  {ms / base:5.2f}x")


if __name__ == "__main__":
    main()
