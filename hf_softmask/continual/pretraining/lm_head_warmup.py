"""The LM-head warm-up before the first domain: the head alone (base model frozen) fitted on general text.

The shipped MiniLM has a freshly initialised MLM head; without the warm-up "forgetting" would measure a head warming
up, not the encoder.

The warm-up is a function of the loaded weights, the general-text blocks, the collator and its settings (its RNG is
forked and seeded, so it draws nothing from the run's stream): :func:`warm_up_lm_head` keeps its result under
``HF_SOFTMASK_CACHE/lm_head_warmup/<key>`` (:func:`warmup_key`) and a later run with the same key loads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ...data import is_masked_lm
from ..distributed import is_sharded
from .result_cache import cache_entry, content_key, publish_entry

__all__ = ["fit_lm_head", "warm_up_lm_head", "warmup_key"]

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


def head_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters outside the base model (the LM head), by name; tied ones (the decoder weight that is the
    input embedding) belong to the base model."""
    base_ids = {id(p) for p in model.base_model.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in base_ids}


def fit_lm_head(model, dataset, collator, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """Train only the parameters outside the base model (the LM head) for ``steps`` steps; returns the losses.

    Its random draws (order, MLM masks, dropout) come from a forked RNG seeded with ``seed``: the result depends
    on the arguments alone and the caller's RNG stream is left as it was."""
    device = next(model.parameters()).device
    devices = [] if device.type == "cpu" else None  # None: every device of that type
    with torch.random.fork_rng(devices=devices, device_type="cuda" if device.type == "cpu" else device.type):
        torch.manual_seed(seed)
        return _fit(model, dataset, collator, steps, lr, batch_size, seed)


def _fit(model, dataset, collator, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    head_params = list(head_parameters(model).values())
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


# -- the cache ----------------------------------------------------------------------------------------------------
CACHE_VERSION = 1  # raise when the warm-up's computation changes: older entries are then never read


def _collator_settings(collator) -> dict:
    """The scalar settings of a collator (mlm, mlm_probability, ...) and its tokenizer's identity."""
    out = {k: v for k, v in sorted(vars(collator).items()) if isinstance(v, (bool, int, float, str, type(None)))}
    tok = getattr(collator, "tokenizer", None)
    if tok is not None:
        out["tokenizer"] = [type(tok).__name__, len(tok), tok.mask_token_id, tok.pad_token_id]
    return {"class": type(collator).__name__, **out}


def warmup_key(model, dataset, collator, steps: int, lr: float, batch_size: int, seed: int) -> str | None:
    """sha256 of what determines the warm-up: the loaded weights (checkpoint files and the fresh head's
    initialisation), the blocks, the collator, the settings, torch's version; None for a sharded model."""
    if is_sharded(model):
        return None
    settings = {
        "version": CACHE_VERSION,
        "model": type(model).__name__,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "collator": _collator_settings(collator),
        "device": next(model.parameters()).device.type,
    }
    blocks = [
        (column, torch.tensor(dataset[column]))
        for column in ("input_ids", "attention_mask")
        if column in dataset.column_names
    ]
    return content_key(settings, [*sorted(model.state_dict().items()), *blocks])


def warm_up_lm_head(
    model, dataset, collator, steps: int, lr: float, batch_size: int, seed: int, say=None
) -> tuple[list[float], Path | None]:
    """:func:`fit_lm_head`, or its cached result: ``(losses, cache entry read or written, or None)``.

    Every process of a launch computes the same key; the first to finish publishes the entry (renamed into place,
    so a reader never sees half of one). ``say`` gets one line on what happened."""
    from safetensors.torch import load_file, save_file

    say = say or (lambda message: None)
    key = warmup_key(model, dataset, collator, steps, lr, batch_size, seed)
    if key is None:
        say(f"LM-head warm-up: {steps} steps (a sharded model is not cached)")
        return fit_lm_head(model, dataset, collator, steps, lr, batch_size, seed), None
    entry = cache_entry("lm_head_warmup", key)
    head = head_parameters(model)
    if (entry / "head.safetensors").is_file():
        saved = load_file(str(entry / "head.safetensors"))
        if set(saved) == set(head):
            with torch.no_grad():
                for name, p in head.items():
                    p.copy_(saved[name].to(p.device, p.dtype))
            losses = json.loads((entry / "losses.json").read_text())
            say(f"LM-head warm-up: {steps} steps, loaded from the cache {entry} (its final loss {losses[-1]:.4f})")
            return losses, entry
        logger.warning("%s holds other tensors than this model's head; it is recomputed", entry)
    say(f"LM-head warm-up: {steps} steps (kept in {entry} for later runs with the same model, data and settings)")
    losses = fit_lm_head(model, dataset, collator, steps, lr, batch_size, seed)
    if not losses:
        return losses, None

    def write(staging: Path) -> None:
        save_file({n: p.detach().cpu().contiguous() for n, p in head.items()}, str(staging / "head.safetensors"))
        (staging / "losses.json").write_text(json.dumps(losses))

    publish_entry(entry, write)
    return losses, entry
