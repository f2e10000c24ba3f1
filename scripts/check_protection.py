"""Check, from a finished pre-training run's checkpoints alone, that domain k protected what domain k-1 left.

    python scripts/check_protection.py RUN_DIR [--domain K]

Reads ``<k-1>_<name>/`` (weights and the accumulated importance that protected domain k) and ``<k>_<name>/``
(weights after domain k), and prints how many entries of units at importance 1 moved (0 in update mode) and, per
parameter, how far the most protected tenth moved relative to unprotected entries (about its mean mask).
Exits 1 if a fully protected entry moved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _stage(run: Path, k: int) -> Path:
    found = sorted(run.glob(f"{k}_*"))
    if not found:
        raise SystemExit(f"{run}: no stage directory {k}_<domain>")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--domain", type=int, default=2, help="Domain k >= 2 to check (default 2).")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from hf_softmask import SoftMaskConfig, UnitImportance, UnitLayout, build_param_masks
    from hf_softmask.strategies import ContinualStrategy

    before, after = _stage(args.run_dir, args.domain - 1), _stage(args.run_dir, args.domain)
    importance = UnitImportance.from_pretrained(before)
    saved = ContinualStrategy.saved_config(before) or {}
    config = SoftMaskConfig(**saved["softmask"]) if isinstance(saved.get("softmask"), dict) else SoftMaskConfig()
    try:
        model = AutoModelForMaskedLM.from_pretrained(before)
    except ValueError:
        model = AutoModelForCausalLM.from_pretrained(before)
    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    name_of = {id(p): n for n, p in model.named_parameters()}
    moved = total = 0
    print(f"{after.name} after {before.name}: softmask mode {config.mode}")
    print("parameter | mean |Δ| of its most protected tenth / of its unprotected entries | their mean mask")
    for p, mask in build_param_masks(UnitLayout.from_model(model), importance, config).items():
        name = name_of[id(p)]
        if name not in a or name not in b:
            continue
        delta = (b[name].float() - a[name].float()).abs()
        m = mask.float().expand_as(delta)
        frozen = m == 0
        moved += int((delta[frozen] > 0).sum())
        total += int(frozen.sum())
        flat = m.flatten()[:: max(1, m.numel() // 1_000_000)]
        low, free = m <= flat.quantile(0.1), m >= 0.999
        if low.any() and free.any() and not torch.equal(low, free):
            print(f"{name} | {float(delta[low].mean() / delta[free].mean()):.3f} | {float(m[low].mean()):.3f}")
    print(f"entries of units at importance 1: {total}, moved: {moved}")
    return 1 if moved and config.mode == "update" else 0


if __name__ == "__main__":
    sys.exit(main())
