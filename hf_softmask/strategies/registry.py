"""Strategy names → classes, as data. Built-in classes are imported lazily so a strategy's module loads only when
used; :func:`register_strategy` adds a class of your own under a name the runners accept."""

from __future__ import annotations

import importlib

__all__ = ["STRATEGIES", "get_strategy", "strategy_class", "available_strategies", "register_strategy"]

#: name -> "module:Class" (relative to hf_softmask.strategies), or the class given to :func:`register_strategy`
STRATEGIES: dict[str, str | type] = {
    "ncl": "naive:NaiveStrategy",
    "ft": "naive:FineTuneStrategy",
    "das": "das:DASStrategy",
    "tss": "tss:TSSStrategy",
    "wsn": "wsn:WSNStrategy",
    "hat": "hat:HATStrategy",
    "adahat": "hat:AdaHATStrategy",
    "cbp": "cbp:CBPStrategy",
    "talos": "talos:TaLoSStrategy",
    "ewc": "ewc:EWCStrategy",
    "kd": "kd:KDStrategy",
    "lora": "lora:LoRAStrategy",
    "freeze_bottom": "freeze_bottom:FreezeBottomStrategy",
}


def register_strategy(name: str, cls: type | None = None, *, replace: bool = False):
    """Register strategy class ``cls`` as ``name`` (``--strategy name`` in the runners, ``get_strategy(name)``).

    Also a class decorator: ``@register_strategy("mine")``. Refused, naming the problem: a name already taken
    (unless ``replace=True``), a class that is not a :class:`~hf_softmask.strategies.ContinualStrategy`, one whose
    ``runners`` is empty or names an unknown runner, one whose ``name`` is not ``name`` (its saved state and
    checkpoints carry that name). Returns ``cls``.
    """
    if cls is None:
        return lambda c: register_strategy(name, c, replace=replace)
    from .base import RUNNERS, ContinualStrategy

    if not isinstance(name, str) or not name:
        raise ValueError(f"register_strategy: the name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, ContinualStrategy)):
        raise TypeError(f"register_strategy({name!r}): {cls!r} is not a subclass of ContinualStrategy")
    runners = tuple(cls.runners) if isinstance(cls.runners, (tuple, list)) else ()
    if not runners or any(r not in RUNNERS for r in runners):
        raise ValueError(
            f"register_strategy({name!r}): {cls.__name__}.runners must name the runners that may use it, some of "
            f"{RUNNERS}; got {cls.runners!r}"
        )
    if cls.name != name:
        raise ValueError(
            f"register_strategy({name!r}): {cls.__name__}.name is {cls.name!r}; set name = {name!r} in the class "
            "(saved strategy state and checkpoints carry it)"
        )
    if name in STRATEGIES and STRATEGIES[name] is not cls and not replace:
        raise ValueError(
            f"register_strategy({name!r}): the name is taken by {_describe(STRATEGIES[name])}; pick another name "
            "or pass replace=True"
        )
    STRATEGIES[name] = cls
    return cls


def _describe(target: str | type) -> str:
    if isinstance(target, str):
        module, cls = target.split(":")
        return f"hf_softmask.strategies.{module}.{cls}"
    return f"{target.__module__}.{target.__qualname__}"


def strategy_class(name: str):
    try:
        target = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}") from None
    if not isinstance(target, str):
        return target
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"hf_softmask.strategies.{module}"), cls)


def get_strategy(name: str, config=None, **settings):
    """Instantiate the strategy registered as ``name`` from its ``config`` or keyword settings (not both)."""
    cls = strategy_class(name)
    if config is None:
        return cls(**settings)
    if cls.config_class is None:
        raise TypeError(f"strategy {name!r} has no config class; pass its settings as keywords")
    return cls(config, **settings)


def available_strategies() -> list[str]:
    return sorted(STRATEGIES)
