"""Continual finetuning over a sequence of classification tasks: configuration, runner and results."""

from .config import DEFAULT_TASKS, PROG, ContinualFinetuningArguments, parse_finetuning_config
from .results import evaluate_task, finetuning_results
from .runner import build_optimizer, run_continual_finetuning

__all__ = [
    "ContinualFinetuningArguments",
    "DEFAULT_TASKS",
    "PROG",
    "build_optimizer",
    "evaluate_task",
    "finetuning_results",
    "parse_finetuning_config",
    "run_continual_finetuning",
]
