"""The learning-rate frontier of plain training, and where another run stands against it.

One definition, used by the pre-training sweep (``write_frontier``) and by ``compare_strategies``
(:mod:`hf_softmask.comparison`, pre-training and finetuning). A run is a point ``(x, y)`` with both axes
lower-is-better: pre-training uses (in-domain loss, forgetting), finetuning (in-task error = 1 - accuracy on each
task right after training it, forgetting). The frontier is the piecewise-linear curve through the non-dominated
plain runs (sorted by ``x``; ``y`` then decreases). A point is

- **behind** when some plain run is at least as good on both axes and better by more than ``tolerance`` on one
  (wherever the point lies), or when it lies above the frontier by more than ``tolerance`` within its range;
- **beyond** only when it is better than the frontier's interpolation by more than ``tolerance`` at equal ``x``
  with ``x`` inside the frontier's ``x`` range, or at equal ``y`` with ``y`` inside its ``y`` range;
- **on** when within ``tolerance`` of the interpolation there;
- **undecided** otherwise: outside both ranges and not dominated. A point past the lowest-learning-rate end (more
  in-domain loss, less forgetting) is what a lower learning rate also buys; only a plain run that far out decides.

``tolerance`` is in the units of both axes (nats for losses, accuracy points for finetuning).

Pre-training runs that kept their per-block held-out losses (``eval_block_losses`` in results.json) also get
paired bootstrap intervals (:func:`hf_softmask.bootstrap.frontier_intervals`): the seeds of one (strategy, lr)
are one row (metrics averaged over seeds, blocks averaged over seeds for the intervals), and then
``beyond_frontier`` is the interval's verdict -- True only when the interval of the forgetting gap to the ncl
frontier lies entirely below 0 -- while ``frontier_position`` stays the point rule above.
"""

from __future__ import annotations

import json
import math
import os
from itertools import pairwise
from pathlib import Path

from ..bootstrap import METRICS, RunBlocks, frontier_intervals
from ..io import atomic_write_json, atomic_write_text

__all__ = [
    "POSITIONS",
    "add_intervals",
    "pareto_front",
    "frontier_position",
    "frontier_records",
    "mark_beyond_frontier",
    "write_frontier",
]

BASELINE = "ncl"
POSITIONS = ("beyond", "on", "behind", "undecided")


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def pareto_front(points) -> list[tuple[float, float]]:
    """Non-dominated ``(x, y)`` points (lower is better on both), by increasing ``x`` (so decreasing ``y``)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted((float(x), float(y)) for x, y in points if _finite(x, y)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _interpolate(front: list[tuple[float, float]], x: float) -> float:
    """The frontier's ``y`` at ``x`` (``front`` sorted by ``x``; ``x`` within its range)."""
    for (x0, y0), (x1, y1) in pairwise(front):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return front[0][1]  # a single-point frontier


def frontier_position(point: tuple[float, float], baseline, tolerance: float = 0.0) -> str:
    """``"beyond" | "on" | "behind" | "undecided"``: ``point`` against the ``baseline`` frontier (module docstring)."""
    x, y = point
    pts = [(float(bx), float(by)) for bx, by in baseline if _finite(bx, by)]
    if not pts or not _finite(x, y):
        return "undecided"
    tol = float(tolerance)
    if any((bx <= x and by < y - tol) or (by <= y and bx < x - tol) for bx, by in pts):
        return "behind"
    front = pareto_front(pts)
    if front[0][0] <= x <= front[-1][0]:
        gap = y - _interpolate(front, x)  # at equal x
    elif front[-1][1] <= y <= front[0][1]:
        gap = x - _interpolate([(b, a) for a, b in reversed(front)], y)  # at equal y: the same curve, axes swapped
    else:
        return "undecided"
    if gap < -tol:
        return "beyond"
    return "behind" if gap > tol else "on"


def mark_beyond_frontier(
    records: list[dict],
    baseline: str = BASELINE,
    tolerance: float = 0.0,
    x: str = "in_domain_loss",
    y: str = "forgetting",
) -> list[dict]:
    """Set ``frontier_position`` and ``beyond_frontier`` on every record that is not a ``baseline`` run.

    ``beyond_frontier``: True for "beyond", False for "on"/"behind", None for "undecided", for baseline runs and for
    runs cut short (``complete`` False: metrics over fewer domains; neither judged nor used as a rival).
    """

    def usable(r):
        return r.get("complete", True) is not False and _finite(r.get(x), r.get(y))

    base = [(r[x], r[y]) for r in records if r.get("strategy") == baseline and usable(r)]
    for r in records:
        if r.get("strategy") == baseline or not usable(r):
            r["frontier_position"] = None
            r["beyond_frontier"] = None
            continue
        pos = frontier_position((r[x], r[y]), base, tolerance)
        r["frontier_position"] = pos
        r["beyond_frontier"] = {"beyond": True, "on": False, "behind": False}.get(pos)
    return records


_POINT_METRICS = ("in_domain_loss", "forgetting", "bwt", "general_loss_increase", "final_mean_loss")


def frontier_records(run_dirs) -> list[dict]:
    """One record per (strategy label, lr): the runs of its seeds averaged (``seeds``, ``runs`` list them)."""
    groups: dict[tuple, list[dict]] = {}
    for d in run_dirs:
        res = json.loads((Path(d) / "results.json").read_text())
        res["_dir"] = str(d)
        groups.setdefault((res.get("run_name") or res.get("strategy"), res.get("learning_rate")), []).append(res)
    records = []
    for (label, lr), runs in groups.items():
        rec = {
            "run": runs[0]["_dir"] if len(runs) == 1 else [r["_dir"] for r in runs],
            "strategy": label,
            "lr": lr,
            "complete": all(r.get("complete") is not False for r in runs),
            "seeds": [r.get("seed") for r in runs],
        }
        for m in _POINT_METRICS:
            values = [r.get(m) for r in runs]
            rec[m] = sum(values) / len(values) if all(_finite(v) for v in values) else None
            if len(runs) > 1:
                rec[f"{m}_per_seed"] = values
        rec["_results"] = runs
        records.append(rec)
    return records


def _label(record: dict) -> str:
    return f"{record['strategy']}@lr{record['lr']:g}"


def add_intervals(records: list[dict], n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> bool:
    """Bootstrap intervals on every complete record whose runs kept per-block losses (module docstring).

    Sets ``intervals`` (metric -> estimate/low/high), and on non-ncl records ``forgetting_gap``, ``general_gap``
    and ``beyond_frontier`` from the interval. Returns False (nothing set) without per-block losses or with fewer
    than 2 complete ncl learning rates.
    """
    usable = [r for r in records if r["complete"] and all("eval_block_losses" in x for x in r["_results"])]
    frontier = [_label(r) for r in usable if r["strategy"] == BASELINE]
    if len(frontier) < 2:
        return False
    blocks = {_label(r): RunBlocks.mean([RunBlocks.from_results(x) for x in r["_results"]]) for r in usable}
    cis = frontier_intervals(blocks, frontier, n_resamples, confidence, seed)
    for r in usable:
        ci = cis[_label(r)]
        r["intervals"] = {m: {k: ci["metrics"][m][k] for k in ("estimate", "low", "high")} for m in METRICS}
        if "forgetting_gap" in ci:
            r["forgetting_gap"], r["general_gap"] = ci["forgetting_gap"], ci["general_gap"]
            r["beyond_frontier"] = ci["beyond_frontier"]
    return True


def _markdown(records: list[dict], confidence: float | None = None) -> str:
    """The table; with intervals each metric reads ``estimate [low, high]`` and the verdict is the interval's."""

    def fmt(v):
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    def cell(r, m):
        ci = r.get("intervals", {}).get(m)
        bounds = ci and _finite(ci["low"], ci["high"])
        return fmt(r.get(m)) + (f" [{ci['low']:.4f}, {ci['high']:.4f}]" if bounds else "")

    head = "vs ncl frontier" + (f" ({confidence:.0%} interval of the forgetting gap)" if confidence else "")
    lines = [
        (
            "| strategy | lr | seeds | in-domain loss | forgetting (nats) | BWT | general-text loss increase | "
            f"forgetting gap to frontier | {head} |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["strategy"], -(r["lr"] or 0))):
        pos = r.get("frontier_position")
        if r["strategy"] == BASELINE:
            mark = "frontier run"
        elif confidence and "forgetting_gap" in r:
            verdict = r["forgetting_gap"].get("verdict")
            mark = "**beyond**" if verdict == "beyond" else (verdict or "undecided")
        else:
            mark = "**beyond**" if pos == "beyond" else (pos or "–")
        gap = r.get("forgetting_gap")
        gap_cell = (
            ""
            if not gap
            else (
                f"{gap['estimate']:.4f} [{gap['low']:.4f}, {gap['high']:.4f}]"
                if _finite(gap["estimate"], gap["low"], gap["high"])
                else "outside the frontier's range"
            )
        )
        seeds = ",".join(str(s) for s in r.get("seeds") or [] if s is not None)
        lines.append(
            f"| {r['strategy']} | {r['lr']:g} | {seeds} | {cell(r, 'in_domain_loss')} | "
            f"{cell(r, 'forgetting')} | {fmt(r['bwt'])} | {cell(r, 'general_loss_increase')} | "
            f"{gap_cell} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def write_frontier(
    output_dir: str | os.PathLike,
    run_dirs,
    tolerance: float = 0.0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    plots: bool = True,
) -> dict:
    """Write ``frontier.json``, ``frontier.md`` and (``plots``) ``frontier.png`` + ``frontier_general.png`` into
    ``output_dir``; with per-block losses in the runs, bootstrap intervals too (``n_resamples``, ``confidence``,
    ``seed``)."""
    out = Path(output_dir)
    records = mark_beyond_frontier(frontier_records(run_dirs), tolerance=tolerance)
    if not records:
        raise ValueError(f"no run directory with a results.json among {list(map(str, run_dirs))}")
    with_ci = add_intervals(records, n_resamples, confidence, seed)
    for r in records:
        r.pop("_results")
    payload = {
        "baseline": BASELINE,
        "tolerance": tolerance,
        "runs": records,
        "intervals": {"resamples": n_resamples, "confidence": confidence, "seed": seed} if with_ci else None,
    }
    atomic_write_json(out / "frontier.json", payload)
    atomic_write_text(out / "frontier.md", _markdown(records, confidence if with_ci else None))
    if plots and any(_finite(r["in_domain_loss"], r["forgetting"]) for r in records):
        from ..plotting import plot_frontier

        for y, name, title in (
            ("forgetting", "frontier.png", "forgetting vs in-domain loss (lower-left is better)"),
            ("general_loss_increase", "frontier_general.png", "general-text loss increase vs in-domain loss"),
        ):
            plain = [(r["in_domain_loss"], r[y]) for r in records if r["strategy"] == BASELINE and r["complete"]]
            plot_frontier(
                records,
                out / name,
                x="in_domain_loss",
                y=y,
                group="strategy",
                label="lr",
                title=title,
                frontier=pareto_front(plain),
            )
    return payload
