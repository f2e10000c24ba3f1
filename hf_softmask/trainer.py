"""SoftMaskTrainer and its TrainingArguments: soft-masking configured like any other training flag."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from .callback import SoftMaskCallback
from .compatibility import check_supported
from .importance import UnitImportance
from .masking import SoftMaskConfig

__all__ = ["SoftMaskTrainingArguments", "SoftMaskTrainer"]


@dataclass
class SoftMaskTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the soft-masking settings (each also a command-line flag)."""

    importance_path: str | None = field(default=None, metadata={"help": "Directory or Hub id of a saved UnitImportance."})
    softmask_mode: str = field(default="update", metadata={"help": SoftMaskConfig.__dataclass_fields__["mode"].metadata["help"]})
    softmask_embeddings: str = field(default="train", metadata={"help": "train | freeze | mean"})
    softmask_norms: str = field(default="train", metadata={"help": "train | freeze | mean"})
    softmask_task_head: str = field(default="train", metadata={"help": "train | freeze | mean"})
    softmask_other: str = field(default="train", metadata={"help": "train | freeze | mean"})
    softmask_mask_power: float = field(default=1.0, metadata={"help": "Mask = 1 - I**p."})

    def softmask_config(self) -> SoftMaskConfig:
        return SoftMaskConfig(
            mode=self.softmask_mode,
            embeddings=self.softmask_embeddings,
            norms=self.softmask_norms,
            task_head=self.softmask_task_head,
            other=self.softmask_other,
            mask_power=self.softmask_mask_power,
        )


class SoftMaskTrainer(Trainer):
    """A Trainer that soft-masks by ``importance`` and saves it with every checkpoint.

    ``importance`` may be given directly or through ``args.importance_path``. Without either, it
    trains like a plain Trainer.
    """

    def __init__(self, *args, importance: UnitImportance | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SoftMaskTrainingArguments):
            raise TypeError("SoftMaskTrainer needs SoftMaskTrainingArguments (a TrainingArguments subclass)")
        check_supported("SoftMaskTrainer", self.args, self.model)  # refused cells of docs/compatibility.md
        if importance is None and self.args.importance_path:
            importance = UnitImportance.from_pretrained(self.args.importance_path)
        self.importance = importance
        self.softmask_callback = None
        if importance is not None:
            self.softmask_callback = SoftMaskCallback(importance, config=self.args.softmask_config())
            # First in line, so its on_log adds the mask statistics before the report_to integrations log them.
            self.callback_handler.callbacks.insert(0, self.softmask_callback)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self.importance is not None:
            self.importance.save_pretrained(output_dir or self.args.output_dir)
