"""Old setting names, one map for both runners: YAML keys, ``--flags``, Python fields and run fingerprints.

An old name sets its new field (converted where the meaning changed), in YAML and on the command line alike; where
runs saved their fingerprint under the old name, :func:`fingerprint_key` keeps that key so that those runs resume.
No torch or transformers import: the command line reads this before anything heavy is loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass

__all__ = ["Rename", "RENAMED", "applies", "renamed", "renamed_flags", "fingerprint_key"]


@dataclass(frozen=True)
class Rename:
    """``new``: the field the old name sets. ``convert``: old value -> new value (only for an old name that is
    still a field of the runner declaring it, so that argparse has typed the value). ``fingerprint_key``: the key
    runs saved the setting under before the rename. ``warns``: a FutureWarning names the new name."""

    new: str
    convert: Callable | None = None
    fingerprint_key: str | None = None
    warns: bool = True


def _steps_per_domain(value):
    """``max_steps_per_domain`` <= 0 meant "train num_train_epochs per domain", which is ``max_steps -1``."""
    return value if value is not None and value > 0 else -1


#: old name -> its replacement. hub_private and warmup_ratio are transformers 4.x names of TrainingArguments fields
#: (transformers 5 reads a warmup_steps < 1 as a ratio), accepted without a warning: they are transformers', not
#: ours to retire. max_steps_per_domain and mask_power are fields of the pre-training runner only;
#: max_steps_per_domain is read without a warning (shipped experiment configs use it). eval_batch_size was the
#: finetuning runner's own field beside the Trainer's per_device_eval_batch_size (the runners' evaluation is per
#: process, so the two mean the same).
RENAMED = {
    "hub_private": Rename("hub_private_repo", warns=False),
    "warmup_ratio": Rename("warmup_steps", warns=False),
    "max_steps_per_domain": Rename("max_steps", convert=_steps_per_domain, warns=False),
    "mask_power": Rename("softmask_mask_power", fingerprint_key="mask_power"),
    "eval_batch_size": Rename("per_device_eval_batch_size"),
}


def applies(old: str, names: Collection[str]) -> bool:
    """Whether ``old`` is an old name for a runner whose fields are ``names``: its new field exists there, and a
    converting rename only where the old name is itself a field (the runner it belongs to)."""
    rename = RENAMED.get(old)
    return rename is not None and rename.new in names and (rename.convert is None or old in names)


def renamed(values: dict, names: Collection[str]) -> dict:
    """``values`` with every old name of a runner with fields ``names`` replaced by its new one (converted, with a
    FutureWarning where it warns); giving both names is refused."""
    out = dict(values)
    for old in [k for k in values if applies(k, names)]:
        rename = RENAMED[old]
        if rename.new in values:
            raise ValueError(f"{old} is the old name of {rename.new}: give only {rename.new}")
        value = out.pop(old)
        if rename.warns:
            _warn(old, rename.new)
        out[rename.new] = rename.convert(value) if rename.convert else value
    return out


def renamed_flags(argv: list[str], names: Collection[str]) -> list[str]:
    """``--old`` / ``--old=value`` as ``--new`` for old names that are not fields themselves (a field, even an old
    name, is parsed into itself and renamed by :func:`renamed` in the runner's ``__post_init__``)."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        old = flag[2:] if flag.startswith("--") else None
        if old and old not in names and applies(old, names):
            if RENAMED[old].warns:
                _warn(old, RENAMED[old].new)
            arg = f"--{RENAMED[old].new}{eq}{value}"
        out.append(arg)
    return out


def fingerprint_key(name: str) -> str:
    """The key a run's fingerprint stores ``name`` under (the old name where runs saved it so)."""
    return _FINGERPRINT_KEYS.get(name, name)


_FINGERPRINT_KEYS = {r.new: r.fingerprint_key for r in RENAMED.values() if r.fingerprint_key}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"--{old} (in YAML {old}:) is the old name of --{new} (in YAML {new}:); use the new name, the old one will "
        "be removed",
        FutureWarning,
        stacklevel=4,
    )
