"""State bytes TSS, WSN and TaLoS keep per finished task (and while a task trains), from the tensors they really keep.

A model's scored weights come in a handful of shapes (q, k, v, o, gate, up, down). The model is built on the meta
device (no memory) only to list its scored weights; for each distinct shape ONE real layer of that shape is built
on the CPU and taken through the strategy's own code: TSS and WSN through a real ``SubnetworkModel`` (score
importance, ``finish_task``, selecting the next task), TaLoS through ``SparseTaskVector.add`` with a
``keep_fraction`` mask. The bytes of the tensors left behind are counted (``numel * element_size``) and multiplied
by how many weights of that shape the model has. So a 1B model's figures need at most one ~50 MB layer at a time.

    python benchmarks/bench_memory.py                       # SmolLM2-135M and the 1.1B Llama shape
    python benchmarks/bench_memory.py --models smollm2-135m --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import Counter, OrderedDict

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES

TALOS_KEEP = 0.1  # TaLoS's default keep_fraction


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def scored_shapes(model_name: str) -> Counter:
    """Counter of (out, in) shapes of the weights TSS/WSN score and TaLoS scopes, from a meta-device model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_softmask.strategies.talos import scoped_parameters
    from hf_softmask.tss.model import TARGET_MODULES_MAPPING

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[model_name]))
    targets = TARGET_MODULES_MAPPING["llama"]
    tss = Counter(
        tuple(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n.endswith(t) for t in targets) and n.startswith("model.")
    )
    talos = Counter(tuple(p.shape) for p in scoped_parameters(model, "linear").values())
    if tss != talos:
        raise RuntimeError(f"TSS targets and TaLoS scope differ: {tss} vs {talos}")
    return tss


def _subnetwork(shape, selection: str):
    from hf_softmask.tss import SubnetworkConfig, get_subnetwork_model

    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    cfg = SubnetworkConfig(
        target_modules=["proj"],
        score_init="magnitude",
        init_score=0.02 if selection == "threshold" else 1.0,
        selection=selection,
        keep_ratio=0.9,
        train_base_weights=selection == "topk",
    )
    tuner = get_subnetwork_model(nn.Sequential(OrderedDict(proj=lin)), cfg)
    return tuner, tuner.subnetwork_layers()["proj"]


def subnetwork_bytes(shape, strategy: str) -> dict:
    """Bytes one layer of ``shape`` holds under TSS or WSN after finishing task 0, while task 1 trains."""
    tuner, layer = _subnetwork(shape, "threshold" if strategy == "tss" else "topk")
    x = torch.randn(4, shape[1])
    tuner.set_task(0)
    if strategy == "tss":
        imp = tuner.compute_score_importance(lambda b: tuner(b).pow(2).mean(), [x])
        tuner.accumulate_importance(imp)
    tuner.finish_task(0)
    tuner(x)  # evaluate finished task 0 (unpacks its mask while it is selected) ...
    tuner.set_task(1)  # ... then select the next task to train
    a = tuner.adapter_name
    per_task = sum(_nbytes(t) for t in layer.subnet_masks[a].values())
    scores = _nbytes(layer.subnet_scores[a])
    importance = _nbytes(layer.subnet_importance[a]) if a in layer.subnet_importance else 0
    cache = _nbytes(layer._mask_cache[1]) if layer._mask_cache is not None else 0
    if strategy == "tss":  # TSSStrategy.soft_masks: 1 - I in the scores' dtype, handed to the optimizer
        update_mask = _nbytes((1.0 - layer.subnet_importance[a]).to(layer.subnet_scores[a].dtype))
    else:  # WSNStrategy.update_masks: bool "not used by an earlier task"
        update_mask = _nbytes(~layer.used_mask(a))
    numel = math.prod(shape)
    return {
        "per_task": per_task,
        "changed_values": 0,
        "float_mask_copies": cache,
        "live": scores + importance + update_mask,
        # before issue 11: WSN allocated an fp32 importance it never read, update masks were in the weight's dtype
        # (fp32 here), and a finished task's float mask stayed cached while the next trained
        "removed": (4 * numel if strategy == "wsn" else 0) + (3 * numel if strategy == "wsn" else 0) + 4 * numel,
    }


def talos_bytes(shape) -> dict:
    """Bytes of one TaLoS task vector (bit mask + changed values) and the live state for a layer of ``shape``."""
    from hf_softmask.baselines.task_vectors import SparseTaskVector

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) < TALOS_KEEP
    w = torch.randn(shape, generator=g)
    tv = SparseTaskVector()
    tv.add("w", mask, w[mask])
    kept = int(mask.sum())
    return {
        "per_task": _nbytes(tv.masks["w"]),
        "changed_values": _nbytes(tv.values["w"]),
        "float_mask_copies": 0,
        # bool trainable mask (= the optimizer's update mask) + the trainable entries' starting values
        "live": _nbytes(mask) + _nbytes(w[mask]),
        # before: int64 indices per kept entry, and the update mask in the parameter's dtype (fp32 here)
        "removed": (8 * kept - _nbytes(tv.masks["w"])) + 3 * mask.numel(),
    }


def measure(model_name: str) -> list[dict]:
    shapes = scored_shapes(model_name)
    n = sum(math.prod(s) * c for s, c in shapes.items())
    rows = []
    for strategy in ("tss", "wsn", "talos"):
        total = Counter()
        for shape, count in shapes.items():
            got = talos_bytes(shape) if strategy == "talos" else subnetwork_bytes(shape, strategy)
            for k, v in got.items():
                total[k] += v * count
        rows.append(
            {
                "model": model_name,
                "strategy": strategy,
                "scored_weights": n,
                **total,
                "mask_bits_per_weight": 8 * total["per_task"] / n,
            }
        )
    return rows


def _mb(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def markdown(rows: list[dict], stamp: str) -> str:
    lines = [
        f"State bytes per finished task, from the tensors each strategy keeps ({stamp}).",
        "",
        (
            "| model | strategy | scored weights | per finished task: mask MB (bits/weight) | + changed values MB | "
            "float mask copies held MB | live training state MB | the old code also kept MB (by formula) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['scored_weights']:,} | "
            f"{_mb(r['per_task'])} ({r['mask_bits_per_weight']:.3f}) | {_mb(r['changed_values'])} | "
            f"{_mb(r['float_mask_copies'])} | {_mb(r['live'])} | {_mb(r['removed'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-1.1b", help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.extend(measure(name))
    day = time.strftime("%Y-%m-%d", time.gmtime())
    stamp = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {day}"
    print(markdown(rows, stamp))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stamp": stamp, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
