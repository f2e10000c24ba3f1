"""Shared pieces of every strategy: the module holding its units, and the one shape of its settings.

A strategy's settings are a :class:`StrategyConfig` dataclass (``<Name>Config``); :class:`ContinualStrategy` reads
its ``config_class`` to build the ``__init__`` signature and the config (:func:`config_signature`,
:func:`build_config`), so every strategy accepts ``config=`` or the fields as keywords and nothing else.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

from torch import nn

__all__ = ["unit_model", "StrategyConfig", "config_signature", "build_config", "config_dict", "check_fields"]


def unit_model(model: nn.Module) -> nn.Module:
    """The transformers model whose units strategies act on.

    The continual finetuning runner wraps the base model in a ``MultiTaskClassifier`` (``model.backbone`` plus
    per-task heads); everywhere else the model itself is the transformers model.
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and getattr(backbone, "config", None) is not None:
        return backbone
    return model


def check_fields(config) -> None:
    """Refuse a value outside a field's ``"choices"`` metadata, and NaN/inf in any field, naming the field.

    No setting means anything at NaN or infinity, and a range check such as ``x < 0`` lets NaN through.
    """
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{type(config).__name__}.{f.name} must be one of {list(choices)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}.{f.name} must be a finite number, got {value}")


@dataclasses.dataclass
class StrategyConfig:
    """Base of every ``<Name>Config``: fields carry ``metadata={"help": ..., "choices": [...]}``.

    ``__post_init__`` checks the choices and finiteness of every field (:func:`check_fields`); a subclass adds its
    range checks after calling ``super().__post_init__()``.
    """

    def __post_init__(self):
        check_fields(self)


def config_signature(config_cls) -> inspect.Signature:
    """``(self, config=None, *, <field>=<default>, ...)`` for a strategy configured by the dataclass ``config_cls``.

    Set as ``__init__.__signature__`` by :class:`~hf_softmask.strategies.ContinualStrategy`, so that
    ``inspect.signature`` (the runners use it to decide which of their settings a strategy accepts, and ``help()``)
    lists the real keywords instead of ``**settings``.
    """
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
    ]
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()  # e.g. a nested config: shown as the value it starts from
        else:
            default = inspect.Parameter.empty
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(params)


def build_config(config_cls, config, settings: dict):
    """``config`` itself, or ``config_cls(**settings)``; unknown settings are refused with the list of valid ones."""
    if config is not None:
        if settings:
            raise TypeError(f"pass either config= or keyword settings, not both (got {sorted(settings)})")
        if not isinstance(config, config_cls):
            raise TypeError(f"config must be a {config_cls.__name__}, got {type(config).__name__}")
        return config
    known = [f.name for f in dataclasses.fields(config_cls) if f.init]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} setting(s) {unknown}; valid: {known or 'none'}")
    return config_cls(**settings)


def config_dict(config) -> dict:
    """The fields of ``config`` as JSON-able values (nested configs as dicts, sets as sorted lists)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif isinstance(value, (set, frozenset)):
            value = sorted(value)
        out[f.name] = value
    return out
