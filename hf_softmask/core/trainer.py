"""SoftMaskTrainer and its TrainingArguments: soft-masking configured like any other training flag."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import Trainer, TrainingArguments

from .callback import MaskDetailToIntegrations, SoftMaskCallback
from .clipping import MaskedClipMixin
from .compatibility import check_supported
from .importance import IMPORTANCE_WEIGHTS, UnitImportance
from .loss_scaling import fix_loss_kwargs
from .softmask_arguments import SoftMaskArguments

__all__ = ["SoftMaskTrainingArguments", "SoftMaskTrainer", "load_importance", "resume_checkpoint"]


@dataclass
class SoftMaskTrainingArguments(SoftMaskArguments, TrainingArguments):
    """``TrainingArguments`` plus the soft-masking settings: ``importance_path`` and one ``softmask_<name>`` flag per
    :class:`~hf_softmask.core.masking.SoftMaskConfig` field
    (:class:`~hf_softmask.core.softmask_arguments.SoftMaskArguments`)."""

    importance_path: str | None = field(
        default=None, metadata={"help": "Directory or Hub id of a saved UnitImportance."}
    )
    allow_softmask_settings_change: bool = field(
        default=False,
        metadata={
            "help": "Resume a checkpoint with other --softmask_* settings than it was trained with (a warning lists "
            "them); without it such a resume is refused naming each setting."
        },
    )


def load_importance(path: str | os.PathLike, what: str = "--importance_path") -> UnitImportance:
    """``UnitImportance.from_pretrained`` whose errors name ``what``, the path or file and the fix (a missing path
    is named by ``from_pretrained`` itself: a local directory, or an ``owner/name`` repo id the Hub does not
    provide)."""
    p = Path(path)
    try:
        return UnitImportance.from_pretrained(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} {e}") from None
    except Exception as e:  # truncated or corrupted files: name them
        raise ValueError(
            f"{what} {path}: cannot read {p / IMPORTANCE_WEIGHTS if p.is_dir() else path} "
            f"({type(e).__name__}: {e}); the file is damaged: restore it or recompute the importance"
        ) from None


def resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=...)`` resumes from: ``True`` means the newest one in
    ``output_dir`` (None when there is none: the Trainer then says so); None or False: no resume."""
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir)
    return resume_from_checkpoint or None


class SoftMaskTrainer(MaskedClipMixin, Trainer):
    """A Trainer that soft-masks by ``importance`` and saves it with every checkpoint.

    In update mode ``max_grad_norm`` clips the masked gradients, as grad mode does (:class:`MaskedClipMixin`).

    ``importance`` may be given directly or through ``args.importance_path``. Without either, it trains like a
    plain Trainer, except when resumed from one of its own checkpoints: ``train(resume_from_checkpoint=...)``
    then masks with the importance saved in that checkpoint.
    """

    def __init__(self, *args, importance: UnitImportance | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SoftMaskTrainingArguments):
            raise TypeError("SoftMaskTrainer needs SoftMaskTrainingArguments (a TrainingArguments subclass)")
        check_supported(
            "SoftMaskTrainer", self.args, self.model, self.accelerator
        )  # refused cells of docs/compatibility.md
        fix_loss_kwargs(self)  # a model averaging its own loss must not be scaled by the number of processes
        if importance is None and self.args.importance_path:
            importance = load_importance(self.args.importance_path)
        self.importance = None
        self.softmask_callback = None
        if importance is not None:
            self._use_importance(importance)

    def _use_importance(self, importance: UnitImportance) -> None:
        self.importance = importance
        self.softmask_callback = SoftMaskCallback(
            importance,
            config=self.args.softmask_config(),
            allow_settings_change=self.args.allow_softmask_settings_change,
            per_layer=True,
        )
        # First in line, so its on_log adds the mask statistics before the report_to integrations log them; the
        # per-layer detail leaves the logs again before the console prints them.
        self.callback_handler.callbacks.insert(0, self.softmask_callback)
        MaskDetailToIntegrations.install(self)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint and self.importance is None and UnitImportance.exists(checkpoint):
            self._use_importance(load_importance(checkpoint, what="resume_from_checkpoint"))
        if checkpoint and self.softmask_callback is not None:
            self.softmask_callback.check_resume(checkpoint)  # before the checkpoint is loaded
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self.importance is not None:
            self.importance.save_pretrained(output_dir or self.args.output_dir)
