"""Sweeps of the pre-training runner: every (strategy or runs entry, learning rate[, seed]), then the frontier."""

from __future__ import annotations

import glob
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from ..cli import user_errors
from ..distributed import is_main_process
from .config import ContinualPretrainingArguments, parse_str_list
from .frontier import write_frontier
from .pretrainer import ContinualPretrainer

__all__ = ["run_sweep", "rewrite_frontier"]


def run_sweep(args: ContinualPretrainingArguments) -> dict:
    """Every (entry, learning rate[, seed]) into ``output_dir/<name>_lr<lr>[_s<seed>]/``, then the frontier files.

    Entries are the ``runs`` list, else one per ``--strategies`` (``--learning_rates`` each). With ``--seeds`` each
    runs once per seed (``seed`` set, ``split_seed`` kept: every seed is evaluated on the same blocks).
    """
    entries = args.sweep_entries()
    seeds = args.seed_list()
    split_seed = args.split_seed if args.split_seed is not None else args.seed
    if not args.runs and len(entries) == 1 and args.run_name:
        entries = [{**entries[0], "name": args.run_name}]
    dirs = []
    # Learning rate outermost: a sweep cut short still holds comparable (strategy, lr) pairs.
    lrs = list(dict.fromkeys(lr for e in entries for lr in e["learning_rates"]))
    plan = (
        [(lr, e) for lr in lrs for e in entries if lr in e["learning_rates"]]
        if not args.runs
        else [(lr, e) for e in entries for lr in e["learning_rates"]]
    )
    runs = [
        (lr, entry, seed, Path(args.output_dir) / (f"{base}_lr{lr:g}" + (f"_s{seed}" if seed is not None else "")))
        for lr, entry in plan
        for base in [entry["strategy"] if not args.runs else entry["name"]]
        for seed in seeds or [None]
    ]
    shard, shards = args.shard()
    for k, (lr, entry, seed, sub) in enumerate(runs):
        if k % shards != shard:
            continue
        run_args = replace(
            args.for_entry(entry, lr),
            output_dir=str(sub),
            split_seed=split_seed,
            seed=args.seed if seed is None else seed,
        )
        ContinualPretrainer(run_args).run()
    dirs = [sub for *_, sub in runs]
    if not is_main_process():
        return {}
    waiting = [d.name for d in dirs if not _finished(d)]
    if waiting:  # another shard still runs these: the one that finishes last writes the frontier
        print(
            f"[continual_pretrain] shard {shard}/{shards} done; {len(waiting)} run(s) of other shards unfinished "
            f"(e.g. {waiting[0]}): the frontier is written when the last one finishes",
            flush=True,
        )
        return {}
    return write_frontier(args.output_dir, dirs, **frontier_settings(args))


def _finished(run_dir: Path) -> bool:
    import json

    path = run_dir / "results.json"
    try:
        return path.is_file() and json.loads(path.read_text()).get("complete") is True
    except ValueError:
        return False


def frontier_settings(args: ContinualPretrainingArguments) -> dict:
    """``write_frontier``'s keyword settings from the run's arguments, the command that made it included."""
    return dict(
        n_resamples=args.bootstrap_resamples,
        confidence=args.bootstrap_confidence,
        primary=args.primary_comparison,
        control=args.control_run,
        command=invocation(),
        plots=args.plots,
    )


def invocation() -> str:
    """The command line of this process, as a user would retype it (``python -m`` or the script path as given)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[:1] = ["-m", Path(argv[0]).parent.name]
    elif argv:
        try:
            argv[0] = os.path.relpath(argv[0])
        except ValueError:
            pass
    return "python " + shlex.join(argv)


def rewrite_frontier(args: ContinualPretrainingArguments) -> dict:
    """The frontier of finished runs only (``--frontier_runs``: directories or globs holding results.json)."""
    dirs = []
    with user_errors():  # a pattern naming no finished run is the user's mistake
        for pattern in parse_str_list(args.frontier_runs):
            expanded = os.path.expanduser(pattern)
            matches = [Path(p) for p in sorted(glob.glob(expanded))] if glob.has_magic(expanded) else [Path(expanded)]
            finished = [d for d in matches if (d / "results.json").is_file()]
            if not finished:
                raise FileNotFoundError(
                    f"--frontier_runs {pattern!r}: no run directory with a results.json matches it"
                )
            dirs.extend(finished)
        # and so are runs that lack the rows the study names (its primary comparison or control)
        return write_frontier(args.output_dir, dirs, **frontier_settings(args))
