"""Plain sequential training (``ncl`` for pre-training, ``ft`` for finetuning): the baseline."""

from .base import ContinualStrategy

__all__ = ["NaiveStrategy"]


class NaiveStrategy(ContinualStrategy):
    """Trains every parameter on each task in turn, with nothing to protect earlier ones."""

    name = "ncl"
    settings = ("pretrain", "finetune")

    def __init__(self, **_):
        pass
