"""The learning-rate frontier: in-domain loss against forgetting for every (strategy, learning rate) run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text

__all__ = ["frontier_records", "mark_beyond_frontier", "write_frontier"]

BASELINE = "ncl"


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


def mark_beyond_frontier(records: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Set ``beyond_frontier`` on every non-baseline run.

    True: less forgetting than EVERY baseline run with equal or better (lower) in-domain loss, and at least one
    such baseline run exists. False: some such baseline run forgets as little or less. None: no baseline run
    is as good in-domain, so the comparison is undecided (it would need a baseline at a higher learning rate),
    or the run is incomplete.
    """
    # A run cut short (complete False) has metrics over fewer domains: it is neither judged nor a rival.
    usable = lambda r: r.get("complete", True) and _finite(r["in_domain_loss"], r["forgetting"])
    base = [r for r in records if r["strategy"] == baseline and usable(r)]
    for r in records:
        if r["strategy"] == baseline or not usable(r):
            r["beyond_frontier"] = None
            continue
        rivals = [b for b in base if b["in_domain_loss"] <= r["in_domain_loss"]]
        r["beyond_frontier"] = None if not rivals else all(r["forgetting"] < b["forgetting"] for b in rivals)
    return records


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _markdown(records: list[dict]) -> str:
    lines = ["| strategy | lr | in-domain loss | forgetting (nats) | BWT | general-text loss increase | beyond ncl frontier |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    for r in sorted(records, key=lambda r: (r["strategy"], -(r["lr"] or 0))):
        mark = {True: "**yes**", False: "no", None: "–"}[r.get("beyond_frontier")]
        lines.append(f"| {r['strategy']} | {r['lr']:g} | {fmt(r['in_domain_loss'])} | {fmt(r['forgetting'])} | {fmt(r['bwt'])} | "
                     f"{fmt(r['general_loss_increase'])} | {mark} |")
    return "\n".join(lines) + "\n"


def write_frontier(output_dir: str | os.PathLike, run_dirs) -> dict:
    """Write ``frontier.json``, ``frontier.md`` and ``frontier.png`` (+ ``frontier_general.png``) into ``output_dir``."""
    from ..plotting import plot_frontier

    out = Path(output_dir)
    records = mark_beyond_frontier(frontier_records(run_dirs))
    if not records:
        raise ValueError(f"no run directory with a results.json among {list(map(str, run_dirs))}")
    payload = {"baseline": BASELINE, "runs": records}
    atomic_write_json(out / "frontier.json", payload)
    atomic_write_text(out / "frontier.md", _markdown(records))
    if any(_finite(r["in_domain_loss"], r["forgetting"]) for r in records):
        plot_frontier(records, out / "frontier.png", x="in_domain_loss", y="forgetting", group="strategy", label="lr",
                      title="forgetting vs in-domain loss (lower-left is better)")
        plot_frontier(records, out / "frontier_general.png", x="in_domain_loss", y="general_loss_increase", group="strategy",
                      label="lr", title="general-text loss increase vs in-domain loss")
    return payload
