"""The Trainer's loss scaling across processes, corrected for models that average their own loss."""

from __future__ import annotations

import torch

__all__ = ["fix_loss_kwargs", "loss_uses_num_items"]


def loss_uses_num_items(model: torch.nn.Module) -> bool:
    """Whether ``model``'s loss divides by the Trainer's ``num_items_in_batch`` (models built on ``loss_function``).

    Why: the Trainer passes ``num_items_in_batch`` (summed over processes) to every model whose forward takes
    ``**kwargs`` and then multiplies the loss by the number of processes. A model that takes ``**kwargs`` but
    averages its own loss (BertForMaskedLM) then reports, and trains on, world size times its loss and, under
    gradient accumulation, accumulation-steps times its gradient. Such models must be treated as not accepting loss
    kwargs. A model's own ``accepts_loss_kwargs`` attribute decides where it has one, as in the Trainer.
    """
    import inspect

    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # a PEFT wrapper: the model inside
    declared = getattr(base, "accepts_loss_kwargs", None)
    if declared is not None:  # the model says so itself, and the Trainer honours that first
        return bool(declared)
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return False
    return "loss_function" in source or "num_items_in_batch" in source


def fix_loss_kwargs(trainer) -> None:
    """Set ``trainer.model_accepts_loss_kwargs`` from what the model's loss really does (see loss_uses_num_items)."""
    if trainer.model_accepts_loss_kwargs and not loss_uses_num_items(trainer.model):
        trainer.model_accepts_loss_kwargs = False
