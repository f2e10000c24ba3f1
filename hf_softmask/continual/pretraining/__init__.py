"""Continual pre-training over a sequence of domains: configuration, the domain loop, evaluation, results, sweeps
and the learning-rate frontier."""

from .config import ContinualPretrainingArguments, parse_config
from .evaluation import FixedEvalSet, lm_eval_loss
from .frontier import mark_beyond_frontier, write_frontier
from .pretrainer import ContinualPretrainer
from .runner import run_continual_pretraining
from .sweep import run_sweep

__all__ = [
    "ContinualPretrainer",
    "ContinualPretrainingArguments",
    "FixedEvalSet",
    "lm_eval_loss",
    "mark_beyond_frontier",
    "parse_config",
    "run_continual_pretraining",
    "run_sweep",
    "write_frontier",
]
