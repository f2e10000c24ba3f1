"""DAS's settings as runner flags: a dataclass mixin generated from :class:`~hf_softmask.strategies.das.DASConfig`.

:class:`DASConfig` declares each setting once (type, default, help, validation); :class:`DASArguments` has one
field per entry of :data:`DAS_FLAGS` with the same type, default and help, and :meth:`DASArguments.das_settings`
checks them with DASConfig's own ``__post_init__`` and hands them to the strategy under DASConfig's names. The
pre-training runner's arguments inherit the mixin (as they inherit ``SoftMaskArguments`` for ``softmask_*``).
"""

from __future__ import annotations

import dataclasses
import typing

from ...strategies.das import DASConfig

__all__ = ["DAS_FLAGS", "DASArguments"]

#: runner flag -> the DASConfig field it sets (the flag names runs and configs already use)
DAS_FLAGS = {
    "contrastive_weight": "contrastive_weight",
    "contrastive_temperature": "temperature",
    "perturbation_dropout": "perturbation_dropout",
}


class _BuildsDASSettings:
    """The method of :class:`DASArguments` (its fields are generated below)."""

    def das_settings(self) -> dict:
        """The DASConfig keywords of the DAS flags, each checked by DASConfig (a ValueError names the flag)."""
        out = {}
        for flag, setting in DAS_FLAGS.items():
            value = getattr(self, flag)
            try:
                DASConfig(**{setting: value})  # one flag at a time, the others at their defaults: an error is its
            except (TypeError, ValueError) as e:
                raise ValueError(f"--{flag}: {e}") from None
            out[setting] = value
        return out


def _flag_field(flag: str, setting: str) -> tuple[str, object, dataclasses.Field]:
    declared = DASConfig.__dataclass_fields__[setting]
    help_text = (
        f"DAS: {declared.metadata['help']}" if flag == setting else f"DAS's {setting}: {declared.metadata['help']}"
    )
    return (
        flag,
        typing.get_type_hints(DASConfig)[setting],
        dataclasses.field(default=declared.default, metadata={**declared.metadata, "help": help_text}),
    )


DASArguments = dataclasses.make_dataclass(
    "DASArguments", [_flag_field(flag, setting) for flag, setting in DAS_FLAGS.items()], bases=(_BuildsDASSettings,)
)
DASArguments.__module__ = __name__  # make_dataclass's own ``module=`` needs Python 3.12
DASArguments.__doc__ = (
    "Dataclass mixin: one field per :data:`DAS_FLAGS` entry (DASConfig's type, default and help) and "
    ":meth:`das_settings`, which checks them with DASConfig and names them as DASConfig does."
)
