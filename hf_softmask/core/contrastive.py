"""DAS contrastive integration: InfoNCE between dropout views and the importance-gated "prior knowledge" view.

Per training step (docs/algorithms.md §4): ``z1``, ``z2`` are two dropout views of the unmasked input through the
full model; ``z3`` is the same input through the same weights with the accumulated importance applied as
forward gates (no frozen teacher copy). Anchor ``z1``, positive ``z2``, negatives the other samples' ``z2``
plus every ``z3`` (its own included).

The views run batched: the rows of every view go through ONE forward, the importance gates acting on the ``z3``
rows only (per-example gates) and dropout drawn independently for every row, so ``z1`` and ``z2`` stay
independent dropout draws. With ``view_gradients=False`` the ``z2``/``z3`` forward runs without autograd (stop-
gradient targets; the contrastive gradient reaches the weights through ``z1`` alone), see docs/das.md.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .gates import UnitGates
from .importance import UnitImportance
from .layout import UnitLayout
from .peft_support import unwrap_peft

__all__ = [
    "ForwardAutocast",
    "das_contrastive_loss",
    "info_nce",
    "masked_mean_pool",
    "sentence_views",
    "unmasked_input_ids",
]


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden[B, T, D]`` over the positions where ``attention_mask`` is 1 (padding excluded)."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def info_nce(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None = None, temperature: float = 0.05
) -> torch.Tensor:
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


def _pooled_views(
    model, ids, mask, layout, dropout, plain: int, importance: UnitImportance | None, ffn_site: str
) -> list[torch.Tensor]:
    """One forward of ``plain`` ungated copies of the batch, then (if ``importance``) one importance-gated copy.

    Returns the pooled ``[B, D]`` of each copy. Every row draws its own dropout.
    """
    B = ids.shape[0]
    copies = plain + (importance is not None)
    rows_ids = ids.repeat(copies, 1)
    rows_mask = None if mask is None else mask.repeat(copies, 1)
    heads = ffn = None
    if importance is not None:
        h, f = importance.heads.to(ids.device), importance.ffn.to(ids.device)
        heads = torch.cat([h.new_ones(plain * B, *h.shape), h.expand(B, *h.shape)])
        ffn = torch.cat([f.new_ones(plain * B, *f.shape), f.expand(B, *f.shape)])
    with UnitGates(layout, heads, ffn, dropout=dropout, per_example=importance is not None, ffn_site=ffn_site):
        pooled = masked_mean_pool(_last_hidden(model, rows_ids, rows_mask), rows_mask)
    return list(pooled.split(B))


def sentence_views(
    model: nn.Module,
    inputs: dict,
    importance: UnitImportance,
    layout: UnitLayout | None = None,
    perturbation_dropout: float = 0.0,
    z1: torch.Tensor | None = None,
    view_gradients: bool = True,
    ffn_gate_site: str = "after_activation",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled ``(z1, z2, z3)`` for one batch; ``model`` must be in train mode so its dropout is on.

    ``perturbation_dropout`` > 0 puts dropout on every gated unit output for the views (for models without
    dropout of their own, e.g. Llama). ``z1`` may be given (already pooled) to reuse the LM forward pass.
    ``view_gradients``: whether ``z2`` and ``z3`` carry gradients (False: computed under ``torch.no_grad``).
    ``ffn_gate_site``: where the importance gates of ``z3`` scale FFN neurons
    (:data:`~hf_softmask.core.gates.FFN_GATE_SITES`).
    The views run under the autocast in force where this is called.
    """
    layout = layout or UnitLayout.from_model(model)
    ids = unmasked_input_ids(inputs)
    mask = inputs.get("attention_mask")

    def run(plain, imp):
        return _pooled_views(model, ids, mask, layout, perturbation_dropout, plain, imp, ffn_gate_site)

    if view_gradients:
        if z1 is None:
            z1, z2, z3 = run(2, importance)
        else:
            z2, z3 = run(1, importance)
        return z1, z2, z3
    if z1 is None:
        (z1,) = run(1, None)
    with torch.no_grad():
        z2, z3 = run(1, importance)
    return z1, z2, z3


def das_contrastive_loss(
    model: nn.Module,
    inputs: dict,
    importance: UnitImportance,
    layout: UnitLayout | None = None,
    temperature: float = 0.05,
    perturbation_dropout: float = 0.0,
    z1: torch.Tensor | None = None,
    view_gradients: bool = True,
    ffn_gate_site: str = "after_activation",
) -> torch.Tensor:
    """InfoNCE(anchor z1, positive z2, negatives = other samples' z2 + every z3) for one batch."""
    z1, z2, z3 = sentence_views(
        model,
        inputs,
        importance,
        layout,
        perturbation_dropout,
        z1=z1,
        view_gradients=view_gradients,
        ffn_gate_site=ffn_gate_site,
    )
    return info_nce(z1, z2, z3, temperature)


class ForwardAutocast:
    """The autocast state of a model's own forward, to run extra forwards (views) under the same one.

    accelerate (Trainer ``bf16``/``fp16``) puts autocast on the model's top-level ``forward``; a submodule
    called from outside, as the views call the base model, would run in full precision. A pre-hook on the
    input embeddings (always called inside the top-level forward) records the state of each forward;
    :meth:`context` re-enters it.
    """

    def __init__(self):
        self._handle = None
        self._module = None
        self.state: tuple[str, torch.dtype] | None = None  # (device type, dtype) when autocast was on

    def watch(self, model: nn.Module) -> None:
        """Record the autocast state of every forward of ``model`` from now on (idempotent)."""
        emb = model.get_input_embeddings()
        if self._module is emb:
            return
        self.close()
        self._module = emb
        self._handle = emb.register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        x = args[0] if args and torch.is_tensor(args[0]) else next(module.parameters())
        device_type = x.device.type
        on = torch.is_autocast_enabled(device_type)
        self.state = (device_type, torch.get_autocast_dtype(device_type)) if on else None

    def context(self):
        """``torch.autocast`` as the last recorded forward had it (nothing if it had none)."""
        if self.state is None:
            return nullcontext()
        return torch.autocast(self.state[0], dtype=self.state[1])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._module = None
        self.state = None
