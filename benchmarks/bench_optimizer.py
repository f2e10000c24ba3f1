"""The optimizer step alone: update-masked AdamW (hf_softmask.core.optim) against torch's AdamW.

Compared on the parameters of a Llama shape with random gradients, every owned slice masked per unit
(the real soft-masking layout): torch AdamW foreach, torch AdamW fused (the Trainer's default), masks on a
fused AdamW with the default settings (the update compiled into one pass: ``compiled="auto"``), masks on a
foreach AdamW (the eager masked step), our step with no masks, and the generic snapshot fallback (copy,
step, interpolate) that the fused mask replaces.
"""

from __future__ import annotations

import statistics

import torch
from common import Env, Row, free, interleaved, llama_model, random_importance

try:
    from hf_softmask.core.layout import UnitLayout
    from hf_softmask.core.masking import SoftMaskConfig, build_param_masks
    from hf_softmask.core.optim import AUTO_COMPILE_AFTER_STEPS, install_update_masks
except ImportError as err:  # pragma: no cover - run from a checkout without `pip install -e .`
    raise SystemExit(f"hf_softmask is not importable ({err}); run `pip install -e .` in the repository") from None


class OpaqueAdamW(torch.optim.AdamW):
    """AdamW under another name: install_update_masks cannot fuse into it and falls back to the snapshot."""


def _optimizer(params, env: Env, fused: bool):
    kw = dict(lr=1e-4, weight_decay=0.01)
    return torch.optim.AdamW(params, fused=True, **kw) if fused else torch.optim.AdamW(params, foreach=True, **kw)


#: Fresh sets of optimizer states per shape: where the moments land in memory moved the compiled step's ratio to
#: torch's fused step by up to ±4 % between sets (10M parameters, 2-core CPU, 2026-12-07), more than rounds do.
STATE_SETS = 3


def _variants(params, masks, env: Env) -> tuple[dict, object, tuple]:
    """Every variant's step on fresh optimizer states, the default one already past its eager steps."""
    foreach = _optimizer(params, env, fused=False)
    fused = _optimizer(params, env, fused=True)
    masked = _optimizer(params, env, fused=False)
    install_update_masks(masked, masks)
    unmasked_ours = _optimizer(params, env, fused=False)
    install_update_masks(unmasked_ours, {})
    snapshot = OpaqueAdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)
    install_update_masks(snapshot, masks)
    fused_masked = _optimizer(params, env, fused=True)
    default = install_update_masks(fused_masked, masks)  # compiled="auto": compiled for a fused optimizer this big
    for _ in range(AUTO_COMPILE_AFTER_STEPS):  # "auto" steps eagerly first; the next (warm-up) step compiles
        fused_masked.step()
    # Updates of 1e-4 per step keep the parameters sane across all the variants' steps.
    variants = {
        "torch AdamW foreach": foreach.step,
        "torch AdamW fused": fused.step,
        "masked AdamW (ours)": masked.step,
        "ours, no masks": unmasked_ours.step,
        "snapshot fallback": snapshot.step,
        "masked fused AdamW (default)": fused_masked.step,  # the first (warm-up) step compiles, outside the timing
    }
    return variants, default, (foreach, fused, masked, unmasked_ours, snapshot, fused_masked)


def run(env: Env, shape: str) -> list[Row]:
    model = llama_model(shape, env)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=env.device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=env.device, dtype=p.dtype) * 1e-3
    masks = build_param_masks(UnitLayout.from_model(model), random_importance(model), SoftMaskConfig())
    n_params = sum(p.numel() for p in params)
    n_masked = sum(p.numel() for p in masks)

    # A step is milliseconds: 15 rounds cost seconds, and a median of 5 moved the ratios by up to 50 % under load.
    warmup, rounds = (1, 15) if env.quick else (3, 20)
    per_set, how = [], ""
    for _ in range(STATE_SETS):
        variants, default, optimizers = _variants(params, masks, env)
        per_set.append(interleaved(variants, env, warmup=warmup, rounds=rounds))
        compile_error = optimizers[-1].__dict__.get("_hf_softmask_compile_error")
        compiled = default.compiled and not compile_error
        how = "compiled" if compiled else f"eager ({compile_error or 'auto chose eager'})"[:60]
        del variants, default, optimizers  # this set's states go before the next set's are made
        free()
    # per variant, the median over the state sets of its median over rounds
    t = {name: statistics.median(s[name].ms for s in per_set) for name in per_set[0]}
    base = t["torch AdamW foreach"]
    fused_ms = t["torch AdamW fused"]
    spread = "/".join(f"{s['masked fused AdamW (default)'].ms / s['torch AdamW fused'].ms:.2f}" for s in per_set)

    def faults(name):  # page faults per step in each state set: the eager steps' temporaries may be mapped fresh
        return "/".join(f"{s[name].faults:.0f}" for s in per_set)

    note = f"{n_params / 1e6:.0f}M params, {100 * n_masked / n_params:.0f}% masked"
    rows = [
        Row(
            "optimizer",
            shape,
            "masked fused AdamW (default)",
            "torch AdamW fused",
            t["masked fused AdamW (default)"],
            fused_ms,
            target="<=1.10x",
            note=f"{note}; {how}; {STATE_SETS} state sets: {spread}",
        ),
        Row(
            "optimizer",
            shape,
            "masked foreach AdamW (eager)",
            "torch AdamW foreach",
            t["masked AdamW (ours)"],
            base,
            target="<=1.10x",
            note=f"page faults/step per set: {faults('masked AdamW (ours)')} vs {faults('torch AdamW foreach')}",
        ),
        Row(
            "optimizer", shape, "masked foreach AdamW (eager)", "torch AdamW fused", t["masked AdamW (ours)"], fused_ms
        ),
        Row("optimizer", shape, "ours, no masks", "torch AdamW foreach", t["ours, no masks"], base),
        Row(
            "optimizer",
            shape,
            "snapshot fallback",
            "torch AdamW foreach",
            t["snapshot fallback"],
            base,
            note="copy + step + lerp",
        ),
    ]
    free(model, params)
    return rows
