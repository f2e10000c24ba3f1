"""Plain sequential training (``ncl`` for pre-training, ``ft`` for finetuning): the baseline."""

from dataclasses import dataclass

from .base import ContinualStrategy
from .units import StrategyConfig

__all__ = ["NaiveConfig", "NaiveStrategy", "FineTuneStrategy"]


@dataclass
class NaiveConfig(StrategyConfig):
    """Settings of :class:`NaiveStrategy` and :class:`FineTuneStrategy`: none (every setting is the Trainer's)."""


class NaiveStrategy(ContinualStrategy):
    """Trains every parameter on each task in turn, with nothing to protect earlier ones."""

    name = "ncl"
    runners = ("pretrain", "finetune")
    config_class = NaiveConfig


class FineTuneStrategy(NaiveStrategy):
    """The same plain sequential training under its finetuning name, so that its runs report ``name: "ft"``."""

    name = "ft"
