"""The LM-head warm-up before the first domain: the head alone (base model frozen) fitted on general text.

The shipped MiniLM has a freshly initialised MLM head; without the warm-up "forgetting" would measure a head warming
up, not the encoder.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from ..data import is_masked_lm

__all__ = ["fit_lm_head"]

logger = logging.getLogger(__name__)


def _head_module(model):
    """The MLM prediction head applied to hidden states (BERT's ``cls``, RoBERTa's ``lm_head``), else None."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


def _warmup_loss(model, head, batch):
    """MLM loss of the head alone: base model without grad, head only at the labelled positions."""
    labels = batch["labels"]
    if head is None:
        return model(**batch).loss
    with torch.no_grad():
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).last_hidden_state
    keep = labels != -100
    # The vocabulary-sized output is the cost; evaluating it at the ~15% labelled tokens only makes the warm-up cheap.
    logits = head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def fit_lm_head(model, dataset, collator, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """Train only the parameters outside the base model (the LM head) for ``steps`` steps; returns the losses."""
    base_ids = {id(p) for p in model.base_model.parameters()}
    head_params = [p for p in model.parameters() if id(p) not in base_ids]
    if not head_params:
        logger.warning(
            "lm_head_warmup_steps > 0 but %s has no LM-head parameters outside its base model", type(model).__name__
        )
        return []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head_params:
        p.requires_grad_(True)
    head = _head_module(model) if is_masked_lm(model) else None
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=gen)
    opt = torch.optim.AdamW(head_params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="LM-head warm-up", leave=False)
        while len(losses) < steps:
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = _warmup_loss(model, head, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1)
                if len(losses) >= steps:
                    break
        bar.close()
    finally:
        for p, f in flags:
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    return losses
