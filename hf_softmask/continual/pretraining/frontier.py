"""The learning-rate frontier of plain training, and where another run stands against it.

One definition, used by the pre-training sweep (``write_frontier``) and by ``compare_strategies``
(:mod:`hf_softmask.continual.comparison`, pre-training and finetuning). A run is a point ``(x, y)`` with both axes
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
intervals and verdicts (:class:`hf_softmask.evaluation.bootstrap.Study`,
:func:`~hf_softmask.evaluation.bootstrap.frontier_verdicts`): the seeds of one (strategy, lr) are one row,
documents are resampled (blocks, for runs made before the evaluation by document, flagged as such), seeds enter
through the jackknife, and ``beyond_frontier`` is the multiplicity-adjusted verdict of the forgetting gap -- while
``frontier_position`` stays the point rule above. docs/statistics.md.
"""

from __future__ import annotations

import json
import math
import os
from itertools import pairwise
from pathlib import Path

from ...evaluation.bootstrap import GAP_METRICS, RunBlocks, Study, beyond_frontier, frontier_verdicts
from ...utils.io import atomic_write_json, atomic_write_text

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


def row_name(name: str) -> tuple[str, float | None]:
    """``"das@lr0.0001"`` / ``"das@1e-4"`` -> ``("das", 0.0001)``; a runs entry name alone -> ``(name, None)``."""
    label, at, lr = name.partition("@")
    if not at:
        return label, None
    try:
        return label, float(lr.removeprefix("lr"))
    except ValueError:
        raise ValueError(f"{name!r}: expected a runs entry name or name@learning_rate (e.g. das@1e-4)") from None


def _matches(record: dict, name: str) -> bool:
    """``name`` (:func:`row_name`) names the record's row, or its runs entry when it gives no learning rate."""
    label, lr = row_name(name)
    return record["strategy"] == label and (lr is None or math.isclose(lr, record["lr"], rel_tol=1e-9))


def control_check(controls: list[dict]) -> str:
    """What the control rows (plain training left out of the frontier) say about it: "beyond" (the frontier
    flatters: no beyond verdict can be believed), "not beyond" (at least one control rate had a defined gap and none
    read beyond) or "untested" (no control row complete, or every one outside the frontier's range: a control with
    no gap checks nothing)."""
    gaps = [r.get("forgetting_gap") or {} for r in controls]
    if any(g.get("adjusted_verdict") == "beyond" for g in gaps):
        return "beyond"
    return "not beyond" if any(g.get("estimate") is not None for g in gaps) else "untested"


def add_intervals(
    records: list[dict],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    primary: str | None = None,
    control: str | None = None,
) -> dict | None:
    """Intervals and verdicts (:mod:`hf_softmask.evaluation.bootstrap`) on every complete record whose runs kept
    per-block losses; returns the statistical part of the design, or None (nothing set) without per-block losses or
    with fewer than 2 complete ncl learning rates.

    Sets ``intervals`` (metric -> estimate/low/high), and on non-ncl records ``forgetting_gap`` and ``general_gap``
    (raw interval, p, Holm-adjusted p and verdict, fragility) and ``beyond_frontier`` from the adjusted verdict of
    the forgetting gap. ``primary``: the comparison named in advance (a row label ``name@lr`` or a runs entry name,
    whose rates then form the primary family); ``control``: a plain-training row left out of the frontier.
    """
    usable = [r for r in records if r["complete"] and all("eval_block_losses" in x for x in r["_results"])]
    frontier = [_label(r) for r in usable if r["strategy"] == BASELINE]
    if len(frontier) < 2:
        return None
    by_doc = all(all("eval_block_docs" in x for x in r["_results"]) for r in usable)
    rows = {_label(r): [RunBlocks.from_results(x) for x in r["_results"]] for r in usable}
    study = Study(rows, n_resamples, confidence, seed, unit="document" if by_doc else "block")
    judged = [_label(r) for r in usable if r["strategy"] != BASELINE]
    primary_rows = [_label(r) for r in usable if primary and r["strategy"] != BASELINE and _matches(r, primary)]
    if primary and not primary_rows:
        raise ValueError(f"primary comparison {primary!r} names no complete row among {judged}")
    verdicts = {m: frontier_verdicts(study, frontier, judged, primary_rows, metric=m) for m in GAP_METRICS}
    for r in usable:
        label = _label(r)
        r["intervals"] = {
            m: {k: v for k, v in ci.items() if k in ("estimate", "low", "high")}
            for m, ci in study.metric_intervals(label).items()
        }
        if label in judged:
            r["forgetting_gap"], r["general_gap"] = (verdicts[m][label] for m in GAP_METRICS)
            r["beyond_frontier"] = beyond_frontier(r["forgetting_gap"]["adjusted_verdict"])
            r["primary"] = label in primary_rows
            r["control"] = bool(control) and _matches(r, control)
    first = next(iter(rows.values()))[0]
    lrs = sorted(r["lr"] for r in usable if r["strategy"] == BASELINE)
    controls = [r for r in usable if r.get("control")]
    return {
        "resampling_unit": study.unit,
        "held_out_documents": dict(zip([*(f"domain {j}" for j in range(first.num_domains)), "general"], study.units)),
        "blocks": first.block_counts,
        "seeds": study.seeds or sorted({s for v in rows.values() for s in (x.seed for x in v) if s is not None}),
        "training_noise": (
            f"in the intervals (seed jackknife over {len(study.seeds)} seeds paired across rows)"
            if study.seeds
            else "NOT in the intervals (fewer than 2 seeds shared by every row)"
        ),
        "resamples": n_resamples,
        "confidence": confidence,
        "bootstrap_seed": seed,
        "interval": "t with Welch-Satterthwaite df over document-resampling + seed-jackknife variance",
        "primary_comparison": primary,
        "primary_rows": primary_rows,
        "adjustment": "holm (primary rows one family; all other rows another)",
        "control_row": control,
        "control_check": control_check(controls) if control else None,
        "frontier_rows": frontier,
        "frontier_learning_rates": lrs,
        "max_adjacent_lr_ratio": max((b / a for a, b in pairwise(lrs)), default=None),
        "evaluation_documents": (
            {"domains": first.docs[:-1], "general": first.docs[-1]} if first.by_document else None
        ),
    }


def _markdown(records: list[dict], design: dict | None = None) -> str:
    """The table; with intervals each metric reads ``estimate [low, high]`` and the verdicts are the intervals'."""

    def fmt(v):
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    def cell(r, m):
        ci = r.get("intervals", {}).get(m)
        bounds = ci and _finite(ci["low"], ci["high"])
        return fmt(r.get(m)) + (f" [{ci['low']:.4f}, {ci['high']:.4f}]" if bounds else "")

    def verdict(r):
        if r["strategy"] == BASELINE:
            return "frontier row", ""
        gap = r.get("forgetting_gap")
        if design and gap:
            adj = gap.get("adjusted_verdict") or "undecided"
            if adj == "fragile":
                w = gap["fragile_without"]
                adj = f"fragile ({gap['verdict']}; {w['verdict'] or 'undecided'} without {w['row']})"
            p = gap.get("p_adjusted")
            return gap.get("verdict") or "undecided", f"**{adj}**" if adj.startswith("beyond") else adj + (
                f" (p_adj {p:.3f})" if p is not None else ""
            )
        pos = r.get("frontier_position")
        return ("**beyond**" if pos == "beyond" else (pos or "–")), ""

    conf = design["confidence"] if design else None
    head = f"raw {conf:.0%} interval" if conf else "vs ncl frontier (point rule)"
    lines = [
        (
            "| row | lr | seeds | in-domain loss | forgetting (nats) | BWT | general-text loss increase | "
            f"forgetting gap to frontier | {head} | adjusted verdict |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["strategy"] != BASELINE, r["strategy"], r["lr"] or 0)):
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
        name = r["strategy"] + (" (primary)" if r.get("primary") else "") + (" (control)" if r.get("control") else "")
        raw, adjusted = verdict(r)
        lines.append(
            f"| {name} | {r['lr']:g} | {seeds} | {cell(r, 'in_domain_loss')} | "
            f"{cell(r, 'forgetting')} | {fmt(r['bwt'])} | {cell(r, 'general_loss_increase')} | "
            f"{gap_cell} | {raw} | {adjusted} |"
        )
    out = "\n".join(lines) + "\n"
    if design:
        out += "\n" + _design_text(design)
    return out


def _design_text(d: dict) -> str:
    """What the table's intervals resample and decide, under it (frontier.md)."""
    ratio = d.get("max_adjacent_lr_ratio")
    dense = ratio is not None and ratio <= math.sqrt(2) * (1 + 1e-3)  # rates written to 5 digits
    lines = [
        f"Design: resampling unit **{d['resampling_unit']}** (held-out units per group: "
        + ", ".join(f"{k} {v}" for k, v in d["held_out_documents"].items())
        + f"); training noise {d['training_noise']}; {d['resamples']} resamples; {d['interval']}.",
        f"Primary comparison (named in advance): {d['primary_comparison'] or 'none named'}"
        + (f" -> rows {', '.join(d['primary_rows'])}" if d.get("primary_rows") else "")
        + f"; adjustment: {d['adjustment']}.",
        f"Frontier learning rates: {', '.join(f'{lr:g}' for lr in d['frontier_learning_rates'])} (largest step "
        + (f"{ratio:.2f}x: " if ratio else "")
        + ("dense, <= sqrt(2))." if dense else "**sparser than sqrt(2)**: the frontier may flatter the rows)."),
    ]
    if d["resampling_unit"] != "document":
        lines.append(
            "**These runs kept no document ids: blocks were resampled as if independent, so the intervals are too "
            "narrow wherever blocks share a document. Do not read verdicts from this table.**"
        )
    if d.get("control_row"):
        check = d["control_check"]  # set by add_intervals whenever a control row is named
        lines.append(
            f"Control row {d['control_row']} (plain training left out of the frontier): "
            + {
                "beyond": "**reads beyond: the frontier flatters, and no beyond verdict here can be believed.**",
                "not beyond": "not beyond, as it must be.",
                "untested": "**no defined gap (outside the frontier's range, or not run): it checked nothing; "
                "the frontier is untested.**",
            }[check]
        )
    if d.get("command"):
        lines.append(f"\nCommand:\n\n```\n{d['command']}\n```")
    return "\n".join(lines) + "\n"


def write_frontier(
    output_dir: str | os.PathLike,
    run_dirs,
    tolerance: float = 0.0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    primary: str | None = None,
    control: str | None = None,
    command: str | None = None,
    plots: bool = True,
) -> dict:
    """Write ``frontier.json``, ``frontier.md`` and (``plots``) ``frontier.png`` + ``frontier_general.png`` into
    ``output_dir``; with per-block losses in the runs, intervals and adjusted verdicts too, and the study's
    ``design`` (what was resampled, seeds, primary comparison, adjustment, ``command``) at the top of frontier.json
    and under the table."""
    out = Path(output_dir)
    records = mark_beyond_frontier(frontier_records(run_dirs), tolerance=tolerance)
    if not records:
        raise ValueError(f"no run directory with a results.json among {list(map(str, run_dirs))}")
    design = add_intervals(records, n_resamples, confidence, seed, primary, control)
    if design is not None:
        design["command"] = command
    for r in records:
        r.pop("_results")
    payload = {"design": design, "baseline": BASELINE, "tolerance": tolerance, "runs": records}
    atomic_write_json(out / "frontier.json", payload)
    atomic_write_text(out / "frontier.md", _markdown(records, design))
    if plots and any(_finite(r["in_domain_loss"], r["forgetting"]) for r in records):
        from ...evaluation.plotting import plot_frontier

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
