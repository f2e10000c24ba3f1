"""Plain sequential training (``ncl`` for pre-training, ``ft`` for finetuning): the baseline."""

from .base import ContinualStrategy

__all__ = ["NaiveStrategy", "FineTuneStrategy"]


class NaiveStrategy(ContinualStrategy):
    """Trains every parameter on each task in turn, with nothing to protect earlier ones."""

    name = "ncl"
    settings = ("pretrain", "finetune")

    def __init__(self, **_):
        pass


class FineTuneStrategy(NaiveStrategy):
    """The same plain sequential training under its finetuning name, so that its runs report ``name: "ft"``."""

    name = "ft"
