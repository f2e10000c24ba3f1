"""The learning-rate frontier of plain training, and where another run stands against it.

One definition, used by the pre-training sweep (``write_frontier``) and by ``compare_strategies``
(:mod:`hf_softmask.comparison`, pre-training and finetuning). A run is a point ``(x, y)`` with both axes
lower-is-better: pre-training uses (in-domain loss, forgetting), finetuning (in-task error = 1 - accuracy on each
task right after training it, forgetting). The frontier is the piecewise-linear curve through the non-dominated plain runs
(sorted by ``x``; ``y`` then decreases). A point is

- **behind** when some plain run is at least as good on both axes and better by more than ``tolerance`` on one
  (wherever the point lies), or when it lies above the frontier by more than ``tolerance`` within its range;
- **beyond** only when it is better than the frontier's interpolation by more than ``tolerance`` at equal ``x``
  with ``x`` inside the frontier's ``x`` range, or at equal ``y`` with ``y`` inside its ``y`` range;
- **on** when within ``tolerance`` of the interpolation there;
- **undecided** otherwise: outside both ranges and not dominated. A point past the lowest-learning-rate end (more
  in-domain loss, less forgetting) is what a lower learning rate also buys; only a plain run that far out decides.

``tolerance`` is in the units of both axes (nats for losses, accuracy points for finetuning).
"""

from __future__ import annotations

import json
import math
import os
from itertools import pairwise
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text

__all__ = ["POSITIONS", "pareto_front", "frontier_position", "frontier_records", "mark_beyond_frontier",
           "write_frontier"]

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


def mark_beyond_frontier(records: list[dict], baseline: str = BASELINE, tolerance: float = 0.0,
                         x: str = "in_domain_loss", y: str = "forgetting") -> list[dict]:
    """Set ``frontier_position`` and ``beyond_frontier`` on every record that is not a ``baseline`` run.

    ``beyond_frontier``: True for "beyond", False for "on"/"behind", None for "undecided", for baseline runs and for
    runs cut short (``complete`` False: metrics over fewer domains; neither judged nor used as a rival).
    """
    usable = lambda r: r.get("complete", True) is not False and _finite(r.get(x), r.get(y))
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


def frontier_records(run_dirs) -> list[dict]:
    """One record per run directory holding a results.json."""
    records = []
    for d in run_dirs:
        res = json.loads((Path(d) / "results.json").read_text())
        records.append({
            "run": str(d),
            "strategy": res.get("run_name") or res.get("strategy"),
            "lr": res.get("learning_rate"),
            "complete": res.get("complete"),
            "in_domain_loss": res.get("in_domain_loss"),
            "forgetting": res.get("forgetting"),
            "bwt": res.get("bwt"),
            "general_loss_increase": res.get("general_loss_increase"),
            "final_mean_loss": res.get("final_mean_loss"),
        })
    return records


def _markdown(records: list[dict]) -> str:
    lines = ["| strategy | lr | in-domain loss | forgetting (nats) | BWT | general-text loss increase | "
             "vs ncl frontier |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    for r in sorted(records, key=lambda r: (r["strategy"], -(r["lr"] or 0))):
        pos = r.get("frontier_position")
        mark = "frontier run" if r["strategy"] == BASELINE else ("**beyond**" if pos == "beyond" else (pos or "–"))
        lines.append(f"| {r['strategy']} | {r['lr']:g} | {fmt(r['in_domain_loss'])} | {fmt(r['forgetting'])} | {fmt(r['bwt'])} | "
                     f"{fmt(r['general_loss_increase'])} | {mark} |")
    return "\n".join(lines) + "\n"


def write_frontier(output_dir: str | os.PathLike, run_dirs, tolerance: float = 0.0) -> dict:
    """Write ``frontier.json``, ``frontier.md`` and ``frontier.png`` (+ ``frontier_general.png``) into ``output_dir``."""
    from ..plotting import plot_frontier

    out = Path(output_dir)
    records = mark_beyond_frontier(frontier_records(run_dirs), tolerance=tolerance)
    if not records:
        raise ValueError(f"no run directory with a results.json among {list(map(str, run_dirs))}")
    payload = {"baseline": BASELINE, "tolerance": tolerance, "runs": records}
    atomic_write_json(out / "frontier.json", payload)
    atomic_write_text(out / "frontier.md", _markdown(records))
    if any(_finite(r["in_domain_loss"], r["forgetting"]) for r in records):
        plot_frontier(records, out / "frontier.png", x="in_domain_loss", y="forgetting", group="strategy", label="lr",
                      title="forgetting vs in-domain loss (lower-left is better)")
        plot_frontier(records, out / "frontier_general.png", x="in_domain_loss", y="general_loss_increase", group="strategy",
                      label="lr", title="general-text loss increase vs in-domain loss")
    return payload
