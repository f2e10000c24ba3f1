"""Continual-learning strategies built on the unit registry, gates and masking machinery."""

from .base import ContinualStrategy, StrategyCallback, StrategyTrainer
from .registry import STRATEGIES, available_strategies, get_strategy, register_strategy, strategy_class

__all__ = [
    "ContinualStrategy",
    "StrategyCallback",
    "StrategyTrainer",
    "STRATEGIES",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "strategy_class",
]
