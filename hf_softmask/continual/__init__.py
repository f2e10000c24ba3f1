"""The runners: continual pre-training (:mod:`.pretraining`), continual finetuning (:mod:`.finetuning`), the
strategy comparison (:mod:`.comparison`), and what they share (command line, checkpoints, processes, console).

The pre-training names are re-exported here, where they have always been importable from."""

from .distributed import end_processes
from .model_loading import load_model_and_tokenizer
from .pretraining import (
    ContinualPretrainer,
    ContinualPretrainingArguments,
    FixedEvalSet,
    lm_eval_loss,
    mark_beyond_frontier,
    parse_config,
    run_continual_pretraining,
    run_sweep,
    write_frontier,
)

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
