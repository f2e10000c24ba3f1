"""Deprecated module: the continual finetuning runner is :mod:`hf_softmask.continual.finetuning`.

The old names still work for one release, each warning once (FutureWarning): ``ContinualFinetuneArguments`` and
``ContinualFinetuneTrainingArguments`` are both :class:`~.finetuning.ContinualFinetuningArguments` (one
``TrainingArguments`` subclass now); ``parse_finetune_config`` returns that one object twice, and
``run_continual_finetune(args, training_args)`` runs it.
"""

from __future__ import annotations

from ..utils.deprecation import warn_renamed
from .finetuning import (
    DEFAULT_TASKS,
    PROG,
    ContinualFinetuningArguments,
    build_optimizer,
    evaluate_task,
    parse_finetuning_config,
    run_continual_finetuning,
)

__all__ = [
    "DEFAULT_TASKS",
    "PROG",
    "build_optimizer",
    "evaluate_task",
    "parse_finetune_config",
    "run_continual_finetune",
]

_CLASSES = ("ContinualFinetuneArguments", "ContinualFinetuneTrainingArguments")


def _warn(old: str, new: str) -> None:
    warn_renamed(f"hf_softmask.continual.finetune.{old}", f"hf_softmask.continual.finetuning.{new}", stacklevel=4)


def parse_finetune_config(argv: list[str] | None = None):
    """Deprecated: :func:`~.finetuning.parse_finetuning_config`; returns its one object as ``(args, args)``."""
    _warn("parse_finetune_config", "parse_finetuning_config")
    args = parse_finetuning_config(argv)
    return args, args


def run_continual_finetune(args, training_args=None, callbacks=None, events=None) -> dict:
    """Deprecated: :func:`~.finetuning.run_continual_finetuning` (one arguments object)."""
    _warn("run_continual_finetune", "run_continual_finetuning")
    if training_args is not None and training_args is not args:
        raise TypeError(
            "run_continual_finetune takes one ContinualFinetuningArguments now (settings and Trainer fields "
            "together); build it with hf_softmask.continual.finetuning.ContinualFinetuningArguments"
        )
    return run_continual_finetuning(args, callbacks=callbacks, events=events)


def __getattr__(name: str):
    if name in _CLASSES:
        _warn(name, "ContinualFinetuningArguments")
        return ContinualFinetuningArguments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
