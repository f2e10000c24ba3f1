"""A TSS subnetwork layer (weight ⊙ straight-through score mask) against a plain ``nn.Linear``.

Forward + backward of one FFN-shaped projection: the plain layer trains its weight; the subnetwork
layer trains its score tensor through the straight-through mask (the weight is frozen), and at
inference uses a finished task's stored bit-packed mask.
"""

from __future__ import annotations

import torch
from common import Env, Row, free, interleaved
from torch import nn


def run(env: Env, d_in: int, d_out: int, tokens: int) -> list[Row]:
    try:
        from hf_softmask.tss import SubnetworkConfig, SubnetworkLinear
    except ImportError as err:
        return [
            Row(
                "TSS layer",
                f"{d_in}x{d_out}",
                "subnetwork fwd+bwd",
                "nn.Linear",
                float("nan"),
                float("nan"),
                note=f"skipped: {err}",
            )
        ]

    torch.manual_seed(0)
    plain = nn.Linear(d_in, d_out, device=env.device, dtype=env.dtype)
    base = nn.Linear(d_in, d_out, device=env.device, dtype=env.dtype)
    base.load_state_dict(plain.state_dict())
    base.requires_grad_(False)
    sub = SubnetworkLinear(base, "default", SubnetworkConfig(target_modules=["x"]))
    sub.to(env.device)
    sub.task = None  # training: live scores through the straight-through mask
    x = torch.randn(tokens, d_in, device=env.device, dtype=env.dtype)

    def fwd_bwd(layer):
        def step():
            layer(x).float().pow(2).mean().backward()
            for p in layer.parameters():
                p.grad = None

        return step

    sub_inf = SubnetworkLinear(
        nn.Linear(d_in, d_out, device=env.device, dtype=env.dtype).requires_grad_(False),
        "default",
        SubnetworkConfig(target_modules=["x"]),
    ).to(env.device)
    sub_inf.store_task_mask("default", 0)
    sub_inf.task = 0

    def infer(layer):
        def step():
            with torch.no_grad():
                layer(x)

        return step

    warmup, rounds = (1, 5) if env.quick else (3, 20)
    t = interleaved(
        {
            "linear train": fwd_bwd(plain),
            "subnet train": fwd_bwd(sub),
            "linear infer": infer(plain),
            "subnet infer": infer(sub_inf),
        },
        env,
        warmup=warmup,
        rounds=rounds,
    )
    shape = f"{d_in}x{d_out}, {tokens} tok"
    rows = [
        Row(
            "TSS layer",
            shape,
            "subnetwork fwd+bwd",
            "nn.Linear fwd+bwd",
            t["subnet train"].ms,
            t["linear train"].ms,
            mem_ratio=None,
            note="scores trained, weight frozen",
        ),
        Row(
            "TSS layer",
            shape,
            "subnetwork inference",
            "nn.Linear inference",
            t["subnet infer"].ms,
            t["linear infer"].ms,
            note="stored task mask, cached unpacked",
        ),
    ]
    free(plain, base, sub, sub_inf, x)
    return rows
