"""A Trainer-style training step (forward, backward, clip, AdamW step) with and without soft-masking.

Variants on one model, each with its own optimizer state so no variant pays for another:
plain step with torch AdamW (foreach, and fused: the Trainer's default), soft-masking in grad mode (gradient
hooks), in update mode on a foreach AdamW (the mask fused into our eager AdamW step), in update mode on a fused
AdamW with default settings (``compile_update="auto"``: the masked update compiled into one pass, compiled once
in the warm-up), and update mode through the snapshot fallback (what fusing avoids). Variants run in
alternating blocks so load drift on a shared machine hits them alike.
"""

from __future__ import annotations

import statistics

import torch
from common import (
    Env,
    Row,
    clock,
    free,
    llama_model,
    lm_batch,
    peak_bytes,
    random_importance,
    ratio_of_peaks,
    reset_peak,
    smollm2_model,
    sync,
)

from hf_softmask.core.masking import SoftMaskConfig, SoftMasker
from hf_softmask.core.optim import AUTO_COMPILE_AFTER_STEPS


class OpaqueAdamW(torch.optim.AdamW):
    """AdamW under another name: install_update_masks cannot fuse into it and falls back to the snapshot."""


def train_step(model, batch: dict, optimizer, max_grad_norm: float = 1.0) -> None:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _adamw(model, fused: bool, cls=torch.optim.AdamW):
    kw = dict(lr=1e-5, weight_decay=0.01)
    return cls(model.parameters(), fused=True, **kw) if fused else cls(model.parameters(), foreach=True, **kw)


def blocks(
    variants: dict, env: Env, warmup: int, rounds: int, iters: int
) -> dict[str, tuple[float, float, int | None]]:
    """``variants``: name -> (attach, step, detach). Returns name -> (median ms, spread, peak bytes)."""
    now = clock(env)
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, int | None] = {}
    for r in range(rounds):
        for name, (attach, step, detach) in variants.items():
            attach()
            for _ in range(warmup if r == 0 else 0):
                step()
            sync(env)
            reset_peak(env)
            for _ in range(iters):
                t0 = now()
                step()
                sync(env)
                times[name].append((now() - t0) * 1e3)
            peak = peak_bytes(env)
            peaks[name] = max(peaks.get(name) or 0, peak or 0) or None
            detach()
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = (med, (max(ts) - min(ts)) / med, peaks[name])
    return out


def run(env: Env, shape: str, batch_size: int, seq_len: int) -> list[Row]:
    model = smollm2_model(env) if shape == "smollm2-135m" else llama_model(shape, env)
    model.train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    batch = lm_batch(model.config.vocab_size, batch_size, seq_len, env.device)
    importance = random_importance(model)
    nothing = lambda: None  # noqa: E731

    opt_plain = _adamw(model, fused=False)
    opt_grad = _adamw(model, fused=False)
    opt_update = _adamw(model, fused=False)
    opt_snapshot = _adamw(model, fused=False, cls=OpaqueAdamW)
    grad_masker = SoftMasker(model, importance, SoftMaskConfig(mode="grad"))
    update_masker = SoftMasker(model, importance, SoftMaskConfig(mode="update"))
    snapshot_masker = SoftMasker(model, importance, SoftMaskConfig(mode="update"))

    variants = {
        "plain (AdamW foreach)": (nothing, lambda: train_step(model, batch, opt_plain), nothing),
        "grad mode": (lambda: grad_masker.attach(), lambda: train_step(model, batch, opt_grad), grad_masker.detach),
        "update mode (fused mask)": (
            lambda: update_masker.attach(opt_update),
            lambda: train_step(model, batch, opt_update),
            update_masker.detach,
        ),
        "update mode (snapshot)": (
            lambda: snapshot_masker.attach(opt_snapshot),
            lambda: train_step(model, batch, opt_snapshot),
            snapshot_masker.detach,
        ),
    }
    opt_fused = opt_default = None
    try:
        opt_fused = _adamw(model, fused=True)
        opt_default = _adamw(model, fused=True)
        variants["plain (AdamW fused)"] = (nothing, lambda: train_step(model, batch, opt_fused), nothing)
    except (RuntimeError, ValueError):  # fused AdamW unsupported for this device/dtype
        pass
    default_masker = SoftMasker(model, importance, SoftMaskConfig(mode="update"))  # compile_update="auto"
    if opt_default is not None:
        # Attached once for all rounds, like a training run: the warm-up step compiles, the timed steps reuse it.
        default_masker.attach(opt_default)
        for _ in range(AUTO_COMPILE_AFTER_STEPS):  # "auto" steps eagerly first; the warm-up step then compiles
            train_step(model, batch, opt_default)
        variants["update mode (fused AdamW, default)"] = (
            nothing,
            lambda: train_step(model, batch, opt_default),
            nothing,
        )

    warmup, rounds, iters = (1, 5, 2) if env.quick else (1, 5, 3)  # 10+ samples each: ratios near 1 need them
    t = blocks(variants, env, warmup, rounds, iters)
    tokens = batch_size * seq_len
    base_ms, _, base_peak = t["plain (AdamW foreach)"]
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    note = f"{n_params:.0f}M params, batch {batch_size}x{seq_len}"
    rows = []
    targets = {"grad mode": "<=1.03x", "update mode (fused mask)": "", "update mode (snapshot)": ""}
    for name, target in targets.items():
        ms, spread, peak = t[name]
        rows.append(
            Row(
                "softmask step",
                shape,
                name,
                "plain (AdamW foreach)",
                ms,
                base_ms,
                target=target,
                mem_ratio=ratio_of_peaks(peak, base_peak),
                note=note if name == "grad mode" else f"spread {spread:.0%}",
                extra={"tokens_per_s": 1e3 * tokens / ms},
            )
        )
    if "plain (AdamW fused)" in t:
        fused_ms, _, fused_peak = t["plain (AdamW fused)"]
        ms, _, peak = t["update mode (fused mask)"]
        rows.append(
            Row(
                "softmask step",
                shape,
                "update mode (fused mask)",
                "plain (AdamW fused)",
                ms,
                fused_ms,
                mem_ratio=ratio_of_peaks(peak, fused_peak),
                note="vs torch's fastest AdamW",
            )
        )
        ms, spread, peak = t["update mode (fused AdamW, default)"]
        handle = default_masker._opt_handle
        error = opt_default.__dict__.get("_hf_softmask_compile_error")
        how = "compiled" if handle.compiled and not error else f"eager ({error or 'auto chose eager'})"[:60]
        rows.insert(
            0,
            Row(
                "softmask step",
                shape,
                "update mode (fused AdamW, default)",
                "plain (AdamW fused)",
                ms,
                fused_ms,
                target="<=1.05x",
                mem_ratio=ratio_of_peaks(peak, fused_peak),
                note=f"{how}, spread {spread:.0%}",
            ),
        )
    grad_masker.detach(), update_masker.detach(), snapshot_masker.detach(), default_masker.detach()
    free(model, opt_plain, opt_grad, opt_update, opt_snapshot, opt_fused, opt_default)
    return rows
