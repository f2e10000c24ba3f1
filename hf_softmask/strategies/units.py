"""The module that holds the attention heads and FFN neurons of a model a strategy is given."""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

__all__ = ["unit_model", "config_signature", "build_config"]


def unit_model(model: nn.Module) -> nn.Module:
    """The transformers model whose units strategies act on.

    The continual finetuning runner wraps the base model in a ``MultiTaskClassifier`` (``model.backbone`` plus
    per-task heads); everywhere else the model itself is the transformers model.
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and getattr(backbone, "config", None) is not None:
        return backbone
    return model


def config_signature(config_cls) -> inspect.Signature:
    """``(self, config=None, *, <field>=<default>, ...)`` for a strategy configured by the dataclass ``config_cls``.

    Set as ``__init__.__signature__`` so that ``inspect.signature`` (the runners use it to decide which of their
    settings a strategy accepts, and ``help()``) lists the real keywords instead of ``**kwargs``.
    """
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(params)


def build_config(config_cls, config, kwargs: dict):
    """``config`` itself, or ``config_cls(**kwargs)`` with a clear error for unknown keywords."""
    if config is not None:
        if kwargs:
            raise TypeError(f"pass either config= or keyword settings, not both (got {sorted(kwargs)})")
        if not isinstance(config, config_cls):
            raise TypeError(f"config must be a {config_cls.__name__}, got {type(config).__name__}")
        return config
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} setting(s) {unknown}; valid: {sorted(known)}")
    return config_cls(**kwargs)
