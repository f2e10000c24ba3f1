"""compute_importance: importance of heads and FFN neurons from data, by a registered estimator and an objective."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .importance import DEFAULT_NORMALIZATION, NORMALIZATIONS, UnitImportance
from .importance_estimators import (
    DEFAULT_ESTIMATOR,
    available_estimators,
    get_estimator,
    register_estimator,
    token_mask,
)
from .layout import UnitLayout
from .peft_support import base_modules, unwrap_peft

__all__ = [
    "move_batch",
    "compute_importance",
    "importance_snapshots",
    "available_estimators",
    "register_estimator",
    "OBJECTIVES",
    "kl_dropout_loss",
    "kl_dropout_sequence_loss",
    "lm_loss",
    "has_dropout",
    "EmptyDataError",
]


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


def _two_views(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last hidden states ``[B, T, D]`` of two forwards of the batch (two dropout draws, fp32) and its token mask."""
    inputs = _model_inputs(batch)
    h1 = model(**inputs, output_hidden_states=True).hidden_states[-1].float()
    h2 = model(**inputs, output_hidden_states=True).hidden_states[-1].float()
    return h1, h2, token_mask(batch, h1)


def kl_dropout_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed KL between the last hidden states of two dropout views of the same input (fp32).

    Returns (loss summed over non-padding tokens, number of tokens).
    """
    h1, h2, mask = _two_views(model, batch)
    # KL(softmax(h1) || softmax(h2)) over the hidden dimension, per token.
    kl = F.kl_div(F.log_softmax(h2, -1), F.log_softmax(h1, -1), log_target=True, reduction="none").sum(-1)
    n = int(mask.sum())
    return (kl * mask).sum(), n


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """The model's own LM loss (MLM on masked inputs with labels, or causal LM), summed over label tokens."""
    from ..data import is_masked_lm

    if "labels" not in batch:
        raise ValueError(
            "objective 'lm_loss' needs batches with 'labels' (masked inputs for MLM); "
            "use hf_softmask.data.lm_data_collator or DataCollatorForLanguageModeling"
        )
    out = model(**batch)
    labels = batch["labels"]
    # Causal LMs shift labels inside the model; count the tokens that actually carry a loss.
    n = int((labels[..., 1:] != -100).sum()) if not is_masked_lm(unwrap_peft(model)) else int((labels != -100).sum())
    return out.loss.float() * max(n, 1), n


def kl_dropout_sequence_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """:func:`kl_dropout_loss` with the published code's softmax axis: over the SEQUENCE (each hidden feature a
    distribution over the tokens), padding left out. Returns (KL summed over features and sequences, tokens)."""
    h1, h2, mask = _two_views(model, batch)
    real = mask.unsqueeze(-1)
    logp1 = F.log_softmax(h1.masked_fill(~real, float("-inf")), dim=1)
    logp2 = F.log_softmax(h2.masked_fill(~real, float("-inf")), dim=1)
    kl = torch.where(real, logp1.exp() * (logp1 - logp2), torch.zeros_like(logp1))
    return kl.sum(), int(mask.sum())


OBJECTIVES: dict[str, Callable] = {
    "kl_dropout": kl_dropout_loss,
    "kl_dropout_sequence": kl_dropout_sequence_loss,
    "lm_loss": lm_loss,
}
#: Objectives that compare two dropout draws: a model without dropout gets ``perturbation_dropout`` for them.
DROPOUT_OBJECTIVES = ("kl_dropout", "kl_dropout_sequence")


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
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def _resolve_objective(objective: str | Callable) -> tuple[Callable, str]:
    loss_fn = OBJECTIVES.get(objective) if isinstance(objective, str) else objective
    if loss_fn is None:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)} or pass a callable")
    return loss_fn, objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")


def importance_snapshots(
    model: nn.Module,
    dataloader: Iterable[dict],
    objective: str | Callable = "lm_loss",
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    estimator_options: dict | None = None,
    at: Iterable[int] | None = None,
    max_batches: int | None = None,
    perturbation_dropout: float = 0.1,
    layout: UnitLayout | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> Iterator[UnitImportance]:
    """Raw importance after each batch count in ``at`` (and after the last batch), from one pass over the data.

    The engine of :func:`compute_importance` (see there for the arguments); ``at`` serves sample-size curves.
    Every process must see the same number of batches: the sums are all-reduced at every snapshot.
    """
    loss_fn, name = _resolve_objective(objective)
    layout = layout or UnitLayout.from_model(model)
    if device is None:
        device = next(model.parameters()).device
    spec = get_estimator(estimator)
    dropout = 0.0
    if name in DROPOUT_OBJECTIVES and not has_dropout(model):
        dropout = perturbation_dropout
        if dropout <= 0:
            raise ValueError(
                f"{name} on a model without dropout needs perturbation_dropout > 0 (both views would be identical)"
            )
    at = sorted(set(at or ()))
    tokens = torch.zeros((), device=device, dtype=torch.float64)
    batches = 0
    total = max_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)

    est = spec(model, layout, device, dropout, **(estimator_options or {}))
    options = {
        "estimator": estimator,
        "estimator_options": dict(estimator_options or {}),
        "objective": name,
        "uses_loss": est.uses_loss,
    }

    def snapshot() -> UnitImportance:
        state = [t.clone() for t in est.state()]
        reduced = tokens.clone()
        _all_reduce_(*state, reduced)
        if batches == 0 or reduced.item() == 0:
            raise EmptyDataError(
                f"compute_importance({name!r}) saw {batches} batches and {int(reduced.item())} tokens; "
                "pass a dataloader with at least one non-empty batch (check the dataset split and max_batches)"
            )
        heads, ffn = est.result(state, reduced.item())
        meta = {"layout": layout.signature(), **options, "batches": batches, "tokens": int(reduced.item())}
        return UnitImportance(heads.float().cpu(), ffn.float().cpu(), meta)

    try:
        with _importance_mode(model, train_mode=est.uses_loss), torch.set_grad_enabled(est.uses_loss):
            bar = tqdm(
                dataloader,
                total=total,
                desc=f"importance ({estimator}, {name})",
                disable=not (show_progress and _is_main_process()),
                leave=False,
            )
            for batch in bar:
                if max_batches is not None and batches >= max_batches:
                    break
                tokens += est.observe(move_batch(batch, device), loss_fn)
                batches += 1
                if batches in at:
                    yield snapshot()
    finally:
        est.close()
    if batches not in at:
        yield snapshot()


def compute_importance(
    model: nn.Module,
    dataloader: Iterable[dict],
    objective: str | Callable = "lm_loss",
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    estimator_options: dict | None = None,
    max_batches: int | None = None,
    perturbation_dropout: float = 0.1,
    normalize: bool = True,
    normalization: str = DEFAULT_NORMALIZATION,
    layout: UnitLayout | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> UnitImportance:
    """Importance of every head and FFN neuron.

    Args:
        objective: ``"kl_dropout"`` (general-knowledge proxy: two dropout views, KL of last hidden
            states, softmax over the hidden features), ``"kl_dropout_sequence"`` (the same with the published
            code's softmax over the sequence), ``"lm_loss"`` (the model's own MLM/causal LM loss), or a callable
            ``(model, batch) -> (summed_loss, n_tokens)``. Estimators without a loss (``activation``,
            ``wanda``) run one forward on the batch's inputs (for MLM batches the masked inputs) and do not
            use it.
        estimator: a name from :func:`available_estimators`: ``gate_gradient`` (default,
            ``sum_batches |d loss / d gate|`` / tokens, as in DAS), ``gate_fisher``, ``activation``,
            ``wanda``, ``random`` (the control); see :mod:`hf_softmask.core.importance_estimators`.
        estimator_options: keyword options of the estimator (``random``: ``seed``, ``base``).
        max_batches: stop after this many batches.
        perturbation_dropout: for ``kl_dropout``/``kl_dropout_sequence`` on a model without dropout, the
            dropout put on gated unit outputs so the two views differ.
        normalize: map into [0, 1] with ``normalization``; False returns the raw estimate.
        normalization: a key of :data:`hf_softmask.core.importance.NORMALIZATIONS`; the default ``"pooled_tanh"``
            is monotonic in the raw estimate across all layers, ``"abs_tanh"`` is the published DAS per-layer
            ``|tanh(z)|`` (see docs/importance.md for the measurements behind the choice).

    Sums are all-reduced across processes before the division by the token count, so every rank gets the
    same importance. Model parameters get no ``.grad`` and the model's train/eval mode is restored.
    """
    if normalize and normalization not in NORMALIZATIONS:  # fail before any forward
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {sorted(NORMALIZATIONS)}")
    *_, raw = importance_snapshots(
        model,
        dataloader,
        objective,
        estimator=estimator,
        estimator_options=estimator_options,
        max_batches=max_batches,
        perturbation_dropout=perturbation_dropout,
        layout=layout,
        device=device,
        show_progress=show_progress,
    )
    raw.meta["normalized"] = normalize
    if not normalize:
        return raw
    if (raw.heads == 0).all() and (raw.ffn == 0).all():
        warnings.warn(
            f"importance ({raw.meta['estimator']}, {raw.meta['objective']}) is zero everywhere",
            RuntimeWarning,
            stacklevel=2,
        )
    return raw.normalized(normalization)
