"""SoftMaskCallback: soft-masking for a plain ``transformers.Trainer``."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from .importance import UnitImportance
from .masking import SoftMaskConfig, SoftMasker

__all__ = ["SoftMaskCallback"]


class SoftMaskCallback(TrainerCallback):
    """Protects important heads and FFN neurons during ``Trainer.train()``.

    Args:
        importance: a :class:`UnitImportance` (values in [0, 1]) or a directory/Hub id holding one.
        mode: ``"update"`` (default) scales the optimizer's whole change of each owned slice by
            ``1 - I``; ``"grad"`` scales gradients (before clipping, once per optimizer step).
        config: a full :class:`SoftMaskConfig`; keyword arguments override its fields.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[SoftMaskCallback(importance, mode="update")])
    """

    def __init__(self, importance: UnitImportance | str | os.PathLike, mode: str | None = None, config: SoftMaskConfig | None = None, **policies):
        if not isinstance(importance, UnitImportance):
            importance = UnitImportance.from_pretrained(importance)
        self.importance = importance
        base = config or SoftMaskConfig()
        fields = {**base.__dict__, **policies}
        if mode is not None:
            fields["mode"] = mode
        self.config = SoftMaskConfig(**fields)
        self.masker: SoftMasker | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.masker is not None:
            self.masker.detach()
        self.masker = SoftMasker(model, self.importance, self.config).attach(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        if self.masker is not None:
            self.masker.detach()
            self.masker = None

    def set_importance(self, importance: UnitImportance) -> None:
        """Swap the importance (e.g. after the next domain); takes effect at once if training."""
        self.importance = importance
        if self.masker is not None:
            self.masker.update(importance)
