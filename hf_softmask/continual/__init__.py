"""Continual pre-training over a sequence of domains: configuration, runner, evaluation and the LR frontier."""

from .config import ContinualPretrainingArguments, parse_config
from .distributed import end_processes
from .evaluation import FixedEvalSet, lm_eval_loss
from .frontier import mark_beyond_frontier, write_frontier
from .model_loading import load_model_and_tokenizer
from .pretrain import run_continual_pretraining
from .pretrainer import ContinualPretrainer
from .sweep import run_sweep

__all__ = [
    "ContinualPretrainer",
    "ContinualPretrainingArguments",
    "end_processes",
    "FixedEvalSet",
    "lm_eval_loss",
    "load_model_and_tokenizer",
    "mark_beyond_frontier",
    "parse_config",
    "run_continual_pretraining",
    "run_sweep",
    "write_frontier",
]
