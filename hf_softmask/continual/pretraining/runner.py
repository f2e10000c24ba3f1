"""Continual pre-training, the public entry: one run (:mod:`.pretrainer`), a sweep or a frontier (:mod:`.sweep`).

The pieces: :mod:`.model_loading` (model names, the SmolLM2 conversion, loading), :mod:`.domain_data` (token
blocks and evaluation sets), :mod:`.lm_head_warmup`, :mod:`.pretrainer` (the domain loop), :mod:`.sweep`.
"""

from __future__ import annotations

from .config import ContinualPretrainingArguments
from .pretrainer import ContinualPretrainer
from .sweep import rewrite_frontier, run_sweep

__all__ = ["run_continual_pretraining"]


def run_continual_pretraining(args: ContinualPretrainingArguments) -> dict:
    """Run one strategy (with ``learning_rates``/``strategies``/``frontier_runs``: a sweep); return its results."""
    if args.frontier_runs:
        return rewrite_frontier(args)
    if args.learning_rates or args.strategies or args.runs or args.seeds:
        return run_sweep(args)
    return ContinualPretrainer(args).run()
