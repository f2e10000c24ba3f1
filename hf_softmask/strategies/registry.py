"""Strategy names → classes, as data. Classes are imported lazily so a strategy's module loads only when used."""

from __future__ import annotations

import importlib

__all__ = ["STRATEGIES", "get_strategy", "strategy_class", "available_strategies"]

#: name -> "module:Class" (relative to hf_softmask.strategies)
STRATEGIES: dict[str, str] = {
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


def strategy_class(name: str):
    try:
        target = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"hf_softmask.strategies.{module}"), cls)


def get_strategy(name: str, config=None, **settings):
    """Instantiate the strategy registered as ``name`` from its ``config`` or keyword settings (not both)."""
    cls = strategy_class(name)
    if config is None:
        return cls(**settings)
    if getattr(cls, "config_class", None) is None:
        raise TypeError(f"strategy {name!r} has no config class; pass its settings as keywords")
    return cls(config, **settings)


def available_strategies() -> list[str]:
    return sorted(STRATEGIES)
