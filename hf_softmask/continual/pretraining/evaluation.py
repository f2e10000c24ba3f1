"""Held-out language-modelling loss, deterministic for MLM (the masking is drawn once with a fixed seed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FixedEvalSet", "lm_eval_loss", "perplexity"]


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped so a diverged loss gives a large finite number instead of an overflow."""
    return math.exp(min(loss, 50.0))


class FixedEvalSet:
    """An evaluation set collated once: every evaluation sees exactly the same masked tokens and labels.

    ``collator`` is applied to ``dataset`` in order, ``batch_size`` rows at a time, under a fixed torch seed
    (DataCollatorForLanguageModeling draws its MLM mask from torch's global RNG or its own seeded generator);
    the global RNG state is restored afterwards so building an eval set does not change training randomness.
    A ``doc`` column (:func:`~hf_softmask.data.build_document_blocks`) is kept aside as ``docs``, one id per block;
    without it every block is its own document.
    """

    def __init__(self, name: str, dataset, collator, batch_size: int = 16, seed: int = 0):
        if len(dataset) == 0:
            raise ValueError(
                f"evaluation set {name!r} is empty; give the domain more evaluation text or a smaller block_size"
            )
        self.name = name
        rows = [dataset[i] for i in range(len(dataset))]
        self.docs: list[str] = [str(r.pop("doc")) if "doc" in r else f"{name}/block{i}" for i, r in enumerate(rows)]
        #: True when ``docs`` names real documents (the bootstrap's resampling unit), False for the legacy stream.
        self.by_document = "doc" in dataset.column_names
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            self.batches: list[dict] = [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        finally:
            torch.random.set_rng_state(state)
        self.num_blocks = len(rows)

    def __len__(self) -> int:
        return len(self.batches)


def _label_tokens(labels: torch.Tensor, causal: bool) -> int:
    # Causal LMs shift labels inside the model, so the first position of each row carries no loss.
    return int((labels[..., 1:] != -100).sum()) if causal else int((labels != -100).sum())


@torch.no_grad()
def lm_eval_loss(model: nn.Module, eval_set: FixedEvalSet | Sequence[dict], causal: bool) -> float:
    """Mean per-token LM loss of ``model`` on ``eval_set`` (eval mode, no dropout; mode restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for batch in getattr(eval_set, "batches", eval_set):
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            n = _label_tokens(batch["labels"], causal)
            if n == 0:
                continue
            out = model(**batch)
            total += float(out.loss.float()) * n
            tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluation set has no label tokens (MLM probability too low or all padding)")
    return total / tokens
