"""The results of a continual pre-training run (``results.json``) from its finished stages in ``state.json``.

Loss matrix ``[i][j]``: held-out loss on domain ``j`` after training domain ``i``; the summary (forgetting, BWT,
FWT) is :func:`hf_softmask.evaluation.continual_metrics.summarize` on its square part, and the per-block losses feed
the frontier's bootstrap intervals (:class:`hf_softmask.evaluation.bootstrap.RunBlocks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...evaluation.continual_metrics import summarize
from ...utils.io import atomic_write_json
from .evaluation import perplexity

if TYPE_CHECKING:
    from ..checkpointing import RunState
    from .config import ContinualPretrainingArguments
    from .data import PretrainingData

__all__ = ["results", "write_results"]

#: Run settings copied into results.json (the frontier table groups and labels runs by them).
RESULT_SETTINGS = ("replay_ratio", "replay_general", "merge_alpha", "ema_decay", "strategy_kwargs")


def results(args: ContinualPretrainingArguments, data: PretrainingData, state: RunState) -> dict:
    """The results of the stages finished so far (``complete`` once every domain is)."""
    names = data.names
    rows = [r["eval_loss"] for r in state.done]
    base = state.base
    general_loss = [base["general_loss"]] + [r["general_loss"] for r in state.done]
    r = len(rows)
    res = {
        "domains": names,
        "strategy": args.strategy,
        "run_name": args.run_name or args.strategy,
        "learning_rate": args.learning_rate,
        "objective": "mlm" if data.mlm else "clm",
        "complete": r == len(names),
        "loss_matrix": rows,
        "perplexity_matrix": [[perplexity(v) for v in row] for row in rows],
        "initial_loss": base["eval_loss"],
        "initial_perplexity": [perplexity(v) for v in base["eval_loss"]],
        "general_loss": general_loss,
        "general_perplexity": [perplexity(v) for v in general_loss],
        "general_loss_increase": general_loss[-1] - general_loss[0],
    }
    if r:
        square = [row[:r] for row in rows]
        summary = summarize(square, higher_is_better=False, random_init_scores=base["eval_loss"][:r])
        res.update(
            {
                "in_domain_loss": sum(rows[i][i] for i in range(r)) / r,
                "final_mean_loss": sum(rows[-1][:r]) / r,
                "forgetting": summary["forgetting"],
                "bwt": summary["bwt"],
                "fwt": summary["fwt"],
            }
        )
    res["train_seconds"] = [d.get("train_seconds") for d in state.done]
    # Per-block held-out losses [stage][domain][block] (stage 0: before training), read by
    # hf_softmask.evaluation.bootstrap.RunBlocks.from_results for the frontier's intervals.
    stages = [base] + list(state.done)
    if all("eval_blocks" in d for d in stages):
        res.update(
            eval_block_losses=[d["eval_blocks"] for d in stages],
            general_block_losses=[d["general_blocks"] for d in stages],
            eval_block_tokens=base["eval_tokens"],
            general_block_tokens=base["general_tokens"],
        )
        if data.general_eval.by_document:
            # The document each block was cut from: the bootstrap's resampling unit (the old evaluation has none).
            res.update(eval_block_docs=[ev.docs for ev in data.eval], general_block_docs=data.general_eval.docs)
    # Wall seconds by kind of work, per stage (0_base first) and in total; a stage resumed mid-domain counts only
    # the time of the process that finished it.
    per_stage = [d.get("seconds") for d in stages]
    res["stage_seconds"] = per_stage
    if all(per_stage):
        res["stage_seconds_total"] = {k: round(sum(d[k] for d in per_stage), 1) for k in per_stage[0]}
    res["seed"] = args.seed
    res["settings"] = {k: getattr(args, k) for k in RESULT_SETTINGS}
    res["merged_parameters"] = [d.get("merged_parameters") for d in state.done]
    return res


def write_results(args: ContinualPretrainingArguments, data: PretrainingData, state: RunState) -> dict:
    """Write ``results.json`` (and, with ``args.plots``, ``perplexity_matrix.png``) into ``args.output_dir``."""
    from ...evaluation.plotting import plot_matrix

    out = Path(args.output_dir)
    res = results(args, data, state)
    atomic_write_json(out / "results.json", res)
    if state.done and args.plots:
        labels = ["before"] + [d["dir"] for d in state.done]
        ppl = [res["initial_perplexity"]] + res["perplexity_matrix"]
        plot_matrix(
            ppl,
            labels,
            data.names,
            out / "perplexity_matrix.png",
            title=f"held-out perplexity ({res['run_name']}, lr={args.learning_rate:g})",
        )
    return res
