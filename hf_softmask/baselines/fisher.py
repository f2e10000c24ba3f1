"""Diagonal Fisher information of a model's own predictive distribution (TaLoS sensitivity, EWC).

``log p(y_hat | x)`` with ``y_hat`` sampled from the model's prediction: one label per example for a
classifier, one token per predicted position for a language model (the positions that carry
labels: masked tokens for an MLM, next tokens for a causal LM; all attended positions when the
batch has no labels), summed over the example's positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.importance_compute import move_batch

__all__ = ["sampled_log_likelihood", "fisher_diagonal"]

_NON_MODEL_KEYS = ("labels", "special_tokens_mask")


def _predicted_positions(model: nn.Module, batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of predicted positions [B, T', V], bool mask [B, T']) for token-level outputs."""
    from ..data import is_masked_lm

    labels = batch.get("labels")
    attn = batch.get("attention_mask")
    if is_masked_lm(model):
        if labels is not None and (labels != -100).any():
            return logits, labels != -100
        return logits, (
            attn.bool() if attn is not None else torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        )
    # causal: position i predicts token i + 1
    if labels is not None:
        return logits[:, :-1], labels[:, 1:] != -100
    mask = (
        attn[:, 1:].bool()
        if attn is not None
        else torch.ones(logits.shape[0], logits.shape[1] - 1, dtype=torch.bool, device=logits.device)
    )
    return logits[:, :-1], mask


def sampled_log_likelihood(model: nn.Module, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example ``sum log p(y_hat | x)`` with ``y_hat`` drawn from the model's own output distribution."""
    inputs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
    logits = model(**inputs).logits.float()
    if logits.dim() == 2:  # sequence classification
        logp = logits.log_softmax(-1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=generator)
        return logp.gather(-1, y).squeeze(-1)
    logits, mask = _predicted_positions(model, batch, logits)
    logp = logits.log_softmax(-1)
    probs = logp.detach().exp().reshape(-1, logp.shape[-1])
    y = torch.multinomial(probs, 1, generator=generator).view(logp.shape[:-1] + (1,))
    return (logp.gather(-1, y).squeeze(-1) * mask).sum(-1)


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[dict],
    params: dict[str, nn.Parameter],
    max_examples: int | None = None,
    per_example: bool = True,
    seed: int = 0,
    desc: str = "Fisher",
    reached: set[str] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over examples of ``(d log p(y_hat|x) / d theta)^2`` for each parameter in ``params``.

    ``reached``, if given, receives the names of the parameters the log-likelihood has a gradient path to (a
    parameter outside every path, e.g. an unused pooler, scores 0 without being insensitive).

    ``per_example=True`` runs one backward per example (the exact diagonal); ``False`` one per batch
    (the gradient of the batch's summed log-likelihood, squared: cheaper, biased upwards by
    cross-example terms). The model runs in eval mode (no dropout); its ``.grad`` fields are left
    cleared. Returns (scores on the parameters' devices, number of examples used).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    seen = 0
    bar = tqdm(total=max_examples, desc=desc, leave=False, disable=max_examples is not None and max_examples < 64)
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            n = len(batch["input_ids"])
            groups = (
                [{k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in batch.items()} for i in range(n)]
                if per_example
                else [batch]
            )
            for group in groups:
                if max_examples is not None and seen >= max_examples:
                    break
                model.zero_grad(set_to_none=True)
                sampled_log_likelihood(model, group, generator).sum().backward()
                for name, p in params.items():
                    if p.grad is not None:
                        scores[name].add_(p.grad.detach().float().pow(2))
                        if reached is not None:
                            reached.add(name)
                k = len(group["input_ids"])
                seen += k
                bar.update(k)
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        bar.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise ValueError("the dataloader yielded no example: cannot estimate a Fisher diagonal")
    return scores, seen
