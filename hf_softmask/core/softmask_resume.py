"""The soft-mask settings a Trainer checkpoint was trained with, and the check that a resume keeps them.

:class:`~hf_softmask.SoftMaskCallback` (and so :class:`~hf_softmask.SoftMaskTrainer`) writes its
:class:`~hf_softmask.core.masking.SoftMaskConfig` into every checkpoint as ``softmask_config.json``. A resume whose
settings differ (e.g. embeddings frozen before, trained after) is refused naming each one, unless the change is
asked for explicitly; then a warning lists them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

from ..utils.io import atomic_write_json
from .masking import SoftMaskConfig

__all__ = ["SOFTMASK_SETTINGS", "SPEED_ONLY", "save_settings", "settings_changes", "check_resume_settings"]

SOFTMASK_SETTINGS = "softmask_config.json"

#: Settings that change how fast the masked update runs, not what it computes: a resume (on another machine, say)
#: may change them.
SPEED_ONLY = ("compile_update",)

#: How a user asks for a change of settings at resume, as the refusal names it.
OPT_IN = "allow_settings_change=True (SoftMaskTrainer: --allow_softmask_settings_change)"


def save_settings(config: SoftMaskConfig, directory: str | os.PathLike) -> None:
    """Write ``config`` into ``directory`` (a Trainer checkpoint) as ``softmask_config.json``."""
    atomic_write_json(Path(directory) / SOFTMASK_SETTINGS, dataclasses.asdict(config))


def settings_changes(saved: dict, config: SoftMaskConfig) -> list[str]:
    """``"name: old -> new"`` for each setting of ``config`` that differs from ``saved`` (speed-only ones aside); a
    setting missing from ``saved`` (written before it existed) counts as its default."""
    changes = []
    for f in dataclasses.fields(SoftMaskConfig):
        if f.name in SPEED_ONLY:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        old, new = saved.get(f.name, default), getattr(config, f.name)
        if old != new:
            changes.append(f"{f.name}: {old!r} -> {new!r}")
    return changes


def check_resume_settings(checkpoint: str | os.PathLike, config: SoftMaskConfig, allow_change: bool) -> None:
    """Refuse (ValueError) resuming ``checkpoint`` with soft-mask settings other than those it was trained with,
    naming each; with ``allow_change``, warn instead. A checkpoint without saved settings gets a warning."""
    path = Path(checkpoint) / SOFTMASK_SETTINGS
    if not path.is_file():
        warnings.warn(
            f"{path} is missing (the checkpoint was written without soft-masking, or by an hf_softmask that did "
            "not save its settings): cannot check that the resumed steps mask as the earlier ones did",
            UserWarning,
            stacklevel=3,
        )
        return
    changes = settings_changes(json.loads(path.read_text()), config)
    if not changes:
        return
    what = f"resuming {checkpoint} with other soft-mask settings than it was trained with: {'; '.join(changes)}"
    if not allow_change:
        raise ValueError(f"{what}. Resume with the checkpoint's settings, or pass {OPT_IN} to change them")
    warnings.warn(f"{what} (allowed: the resumed steps use the new settings)", UserWarning, stacklevel=3)
