"""DAS contrastive integration: InfoNCE between dropout views and the importance-gated "prior knowledge" view.

Per training step (ALGORITHMS.md §4): ``z1``, ``z2`` are two dropout views of the unmasked input through the
full model; ``z3`` is the same input through the same weights with the accumulated importance applied as
forward gates (no frozen teacher copy). Anchor ``z1``, positive ``z2``, negatives the other samples' ``z2``
plus every ``z3``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gates import UnitGates
from .importance import UnitImportance
from .layout import UnitLayout
from .peft_support import unwrap_peft

__all__ = ["masked_mean_pool", "info_nce", "unmasked_input_ids", "sentence_views", "das_contrastive_loss"]


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden[B, T, D]`` over the positions where ``attention_mask`` is 1 (padding excluded)."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None = None, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE with cosine similarity: ``anchor[i]`` must pick ``positive[i]`` among all positives and ``negatives``.

    Args:
        anchor, positive: ``[B, D]``; the other rows of ``positive`` are in-batch negatives.
        negatives: ``[N, D]`` extra negatives shared by every anchor (DAS: every ``z3``).
    Returns the mean cross-entropy over the batch (fp32).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if anchor.shape != positive.shape:
        raise ValueError(f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} must have the same shape")
    a = F.normalize(anchor.float(), dim=-1)
    candidates = positive.float() if negatives is None else torch.cat([positive.float(), negatives.float()], 0)
    logits = a @ F.normalize(candidates, dim=-1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, target)


def unmasked_input_ids(inputs: dict) -> torch.Tensor:
    """The original token ids: an MLM collator replaced some ``input_ids`` and kept the originals in ``labels``."""
    ids = inputs["input_ids"]
    labels = inputs.get("labels")
    if labels is None or labels.shape != ids.shape:
        return ids
    # Causal-LM labels equal input_ids (padding aside), so this is a no-op for them.
    return torch.where(labels != -100, labels, ids)


def _last_hidden(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    # The base model alone: its last hidden state is the LM's hidden_states[-1], without paying for the
    # vocabulary-sized LM head that the views do not need.
    inner = unwrap_peft(model)  # under PEFT, base_model is the tuner (LoraModel), not the transformers base
    base = getattr(inner, "base_model", inner)
    out = base(input_ids=input_ids, attention_mask=attention_mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def sentence_views(
    model: nn.Module,
    inputs: dict,
    importance: UnitImportance,
    layout: UnitLayout | None = None,
    perturbation_dropout: float = 0.0,
    z1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled ``(z1, z2, z3)`` for one batch; ``model`` must be in train mode so its dropout is on.

    ``perturbation_dropout`` > 0 puts dropout on every gated unit output for the views (for models without
    dropout of their own, e.g. Llama). ``z1`` may be given (already pooled) to reuse the LM forward pass.
    """
    layout = layout or UnitLayout.from_model(model)
    ids = unmasked_input_ids(inputs)
    mask = inputs.get("attention_mask")
    device = ids.device
    if z1 is None:
        with UnitGates(layout, dropout=perturbation_dropout):
            z1 = masked_mean_pool(_last_hidden(model, ids, mask), mask)
    with UnitGates(layout, dropout=perturbation_dropout):
        z2 = masked_mean_pool(_last_hidden(model, ids, mask), mask)
    # The prior-knowledge view: the same weights, each unit scaled by its accumulated importance.
    with UnitGates(layout, importance.heads.to(device), importance.ffn.to(device), dropout=perturbation_dropout):
        z3 = masked_mean_pool(_last_hidden(model, ids, mask), mask)
    return z1, z2, z3


def das_contrastive_loss(
    model: nn.Module,
    inputs: dict,
    importance: UnitImportance,
    layout: UnitLayout | None = None,
    temperature: float = 0.05,
    perturbation_dropout: float = 0.0,
    z1: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE(anchor z1, positive z2, negatives = other samples' z2 + every z3) for one batch."""
    z1, z2, z3 = sentence_views(model, inputs, importance, layout, perturbation_dropout, z1=z1)
    return info_nce(z1, z2, z3, temperature)
