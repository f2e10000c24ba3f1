"""Continual-learning strategies built on the unit registry, gates and masking machinery."""

from .base import ContinualStrategy, StrategyCallback, StrategyTrainer

__all__ = ["ContinualStrategy", "StrategyCallback", "StrategyTrainer"]
