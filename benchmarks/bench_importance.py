"""Importance throughput (``hf_softmask.compute_importance``) against training throughput, in tokens/s.

Both see the same batches. Training: forward, backward, clip, AdamW step. Importance: ``lm_loss``
(one forward and a backward to the unit gates, no parameter gradients) and ``kl_dropout`` (two
forwards, the general-knowledge proxy).
"""

from __future__ import annotations

import torch

from bench_softmask_step import train_step
from common import Env, Row, clock, free, lm_batch, llama_model, sync


def run(env: Env, shape: str, batch_size: int, seq_len: int) -> list[Row]:
    from hf_softmask import UnitLayout, compute_importance

    model = llama_model(shape, env)
    model.train()
    model.config.use_cache = False
    n_batches = 2 if env.quick else 6
    batches = [lm_batch(model.config.vocab_size, batch_size, seq_len, env.device, seed=i) for i in range(n_batches)]
    tokens = n_batches * batch_size * seq_len
    layout = UnitLayout.from_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    now = clock(env)

    def train_all():
        for b in batches:
            train_step(model, b, opt)

    def importance(objective):
        return lambda: compute_importance(model, batches, objective, layout=layout, show_progress=False)

    variants = {"train": train_all, "lm_loss": importance("lm_loss"), "kl_dropout": importance("kl_dropout")}
    for fn in variants.values():  # warm-up (allocator, optimizer state)
        fn()
    rounds = 2 if env.quick else 3
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(env)
            t0 = now()
            fn()
            sync(env)
            tps = tokens / (now() - t0)
            best[name] = max(best.get(name, 0.0), tps)  # best round: least disturbed by other jobs
    rows = []
    for name in ("lm_loss", "kl_dropout"):
        rows.append(Row("importance", shape, f"importance {name}", "training step", best[name], best["train"], unit="tok/s",
                        target=">=0.7x" if name == "lm_loss" else "", note=f"{n_batches} batches of {batch_size}x{seq_len}"))
    free(model, opt, batches)
    return rows
