"""Importance of heads and FFN neurons from the gradient of a loss with respect to unit gates."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .gates import UnitGates
from .importance import UnitImportance
from .layout import UnitLayout
from .peft_support import base_modules, unwrap_peft

__all__ = ["move_batch", "compute_importance", "OBJECTIVES", "kl_dropout_loss", "lm_loss", "has_dropout", "EmptyDataError"]


class EmptyDataError(ValueError):
    """A dataloader that yielded no batch (or no token)."""


def has_dropout(model: nn.Module) -> bool:
    """True if any dropout module of ``model`` has p > 0 (Llama-family models have none)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in base_modules(model)) or any(
        float(getattr(model.config, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "attn_pdrop", "hidden_dropout")
    )


def move_batch(batch: dict, device) -> dict:
    """The batch with every tensor on ``device`` (other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _token_mask(batch: dict, hidden: torch.Tensor) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return mask.bool()


def kl_dropout_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed KL between the last hidden states of two dropout views of the same input (fp32).

    Returns (loss summed over non-padding tokens, number of tokens).
    """
    inputs = _model_inputs(batch)
    h1 = model(**inputs, output_hidden_states=True).hidden_states[-1].float()
    h2 = model(**inputs, output_hidden_states=True).hidden_states[-1].float()
    mask = _token_mask(batch, h1)
    # KL(softmax(h1) || softmax(h2)) over the hidden dimension, per token.
    kl = F.kl_div(F.log_softmax(h2, -1), F.log_softmax(h1, -1), log_target=True, reduction="none").sum(-1)
    n = int(mask.sum())
    return (kl * mask).sum(), n


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """The model's own LM loss (MLM on masked inputs with labels, or causal LM), summed over label tokens."""
    if "labels" not in batch:
        raise ValueError(
            "objective 'lm_loss' needs batches with 'labels' (masked inputs for MLM); "
            "use hf_softmask.data.lm_data_collator or DataCollatorForLanguageModeling"
        )
    out = model(**batch)
    labels = batch["labels"]
    # Causal LMs shift labels inside the model; count the tokens that actually carry a loss.
    n = int((labels[..., 1:] != -100).sum()) if not _is_mlm(model) else int((labels != -100).sum())
    return out.loss.float() * max(n, 1), n


def _is_mlm(model: nn.Module) -> bool:
    model = unwrap_peft(model)
    return not getattr(model.config, "is_decoder", False) and type(model).__name__.endswith("ForMaskedLM")


OBJECTIVES: dict[str, Callable] = {"kl_dropout": kl_dropout_loss, "lm_loss": lm_loss}


@contextmanager
def _importance_mode(model: nn.Module, train_mode: bool):
    """Dropout on (train mode), model parameters frozen; both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.train(train_mode)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for p, g in grads:
            p.grad = g
        model.train(was_training)


def _all_reduce_(*tensors: torch.Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def compute_importance(
    model: nn.Module,
    dataloader: Iterable[dict],
    objective: str | Callable = "lm_loss",
    *,
    max_batches: int | None = None,
    perturbation_dropout: float = 0.1,
    normalize: bool = True,
    layout: UnitLayout | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> UnitImportance:
    """Importance of every head and FFN neuron: ``sum_batches |d loss / d gate|`` / tokens.

    Args:
        objective: ``"kl_dropout"`` (general-knowledge proxy: two dropout views, KL of last hidden
            states), ``"lm_loss"`` (the model's own MLM/causal LM loss), or a callable
            ``(model, batch) -> (summed_loss, n_tokens)``.
        max_batches: stop after this many batches.
        perturbation_dropout: for ``kl_dropout`` on a model without dropout, the dropout put on
            gated unit outputs so the two views differ.
        normalize: return per-layer ``|tanh(z)|`` in [0, 1]; False returns the raw averages.

    Gradients are taken per batch (gate grads zeroed between batches), summed as absolute values,
    all-reduced across processes, then divided by the token count. Model parameters get no ``.grad``
    and the model's train/eval mode is restored.
    """
    loss_fn = OBJECTIVES.get(objective) if isinstance(objective, str) else objective
    if loss_fn is None:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)} or pass a callable")
    name = objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
    layout = layout or UnitLayout.from_model(model)
    if device is None:
        device = next(model.parameters()).device
    dropout = 0.0
    if name == "kl_dropout" and not has_dropout(model):
        dropout = perturbation_dropout
        if dropout <= 0:
            raise ValueError("kl_dropout on a model without dropout needs perturbation_dropout > 0 (both views would be identical)")

    gates = UnitGates.trainable(layout, device=device, dropout=dropout)
    head_sum = torch.zeros(layout.num_layers, layout.num_heads, device=device, dtype=torch.float64)
    ffn_sum = torch.zeros(layout.num_layers, layout.ffn_size, device=device, dtype=torch.float64)
    tokens = torch.zeros((), device=device, dtype=torch.float64)
    batches = 0
    total = max_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)
    try:
        with _importance_mode(model, train_mode=True):
            bar = tqdm(dataloader, total=total, desc=f"importance ({name})", disable=not (show_progress and _is_main_process()), leave=False)
            for batch in bar:
                if max_batches is not None and batches >= max_batches:
                    break
                batch = move_batch(batch, device)
                loss, n = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"importance loss is {loss.item()} at batch {batches}; the model or data produce NaN/Inf "
                        "(check for empty sequences, fp16 overflow, or a diverged checkpoint)"
                    )
                gates.zero_grad()
                loss.backward()
                head_sum += gates.head_gate.grad.abs().double()
                ffn_sum += gates.ffn_gate.grad.abs().double()
                tokens += n
                batches += 1
    finally:
        gates.remove()
    _all_reduce_(head_sum, ffn_sum, tokens)
    if batches == 0 or tokens.item() == 0:
        raise EmptyDataError(
            f"compute_importance({name!r}) saw {batches} batches and {int(tokens.item())} tokens; "
            "pass a dataloader with at least one non-empty batch (check the dataset split and max_batches)"
        )
    heads = (head_sum / tokens).float().cpu()
    ffn = (ffn_sum / tokens).float().cpu()
    meta = {"layout": layout.signature(), "objective": name, "batches": batches, "tokens": int(tokens.item()), "normalized": normalize}
    raw = UnitImportance(heads, ffn, meta)
    if not normalize:
        return raw
    if (heads == 0).all() and (ffn == 0).all():
        warnings.warn(f"importance ({name}) is zero everywhere: the loss does not depend on the gates", RuntimeWarning, stacklevel=2)
    return raw.normalized()

