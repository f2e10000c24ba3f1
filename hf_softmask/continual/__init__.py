"""The runners: continual pre-training (:mod:`.pretraining`), continual finetuning (:mod:`.finetuning`), the
strategy comparison (:mod:`.comparison`), and what they share (command line, checkpoints, processes, console).

The pre-training names are re-exported here, where they have always been importable from."""

from .distributed import end_processes
from .model_loading import load_model_and_tokenizer
from .pretraining.config import ContinualPretrainingArguments, parse_config
from .pretraining.evaluation import FixedEvalSet, lm_eval_loss
from .pretraining.frontier import mark_beyond_frontier, write_frontier
from .pretraining.pretrainer import ContinualPretrainer
from .pretraining.runner import run_continual_pretraining
from .pretraining.sweep import run_sweep

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
