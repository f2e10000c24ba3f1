"""The one frontier definition (continual.frontier), on hand-made points."""

from __future__ import annotations

import json

import pytest

from hf_softmask.comparison import frontier_position as comparison_position
from hf_softmask.continual.frontier import (
    frontier_position,
    mark_beyond_frontier,
    pareto_front,
    write_frontier,
)

# (x = in-domain loss, y = forgetting); (3.3, 0.20) is dominated by (3.2, 0.10)
PLAIN = [(3.0, 0.30), (3.2, 0.10), (3.4, 0.05), (3.3, 0.20)]


def test_pareto_front_drops_dominated_points():
    assert pareto_front(PLAIN) == [(3.0, 0.30), (3.2, 0.10), (3.4, 0.05)]


@pytest.mark.parametrize("point, want", [
    ((3.1, 0.10), "beyond"),     # inside the x range: the frontier at 3.1 is 0.20
    ((3.1, 0.195), "on"),        # within the tolerance of 0.20
    ((3.1, 0.25), "behind"),
    ((3.3, 0.06), "beyond"),     # frontier at 3.3 is 0.075
    ((2.9, 0.25), "beyond"),     # x outside, y inside: at forgetting 0.25 the frontier's loss is 3.05
    ((2.9, 0.35), "undecided"),  # outside both ranges: a plain run at a higher learning rate would decide
    ((3.6, 0.01), "undecided"),  # past the lowest-lr end: what a lower learning rate also buys
    ((3.6, 0.04), "undecided"),
    ((3.6, 0.06), "behind"),     # (3.4, 0.05) is better on both axes, wherever the point lies
    ((3.5, 0.20), "behind"),     # x outside, y inside: at forgetting 0.2 the frontier's loss is 3.1
    ((2.8, 0.01), "undecided"),  # dominates every plain run but lies outside both ranges
    ((3.2, float("nan")), "undecided"),
])
def test_positions_against_hand_interpolation(point, want):
    assert frontier_position(point, PLAIN, tolerance=0.01) == want
    assert comparison_position(point, PLAIN, 0.01) == want  # compare_strategies uses the same function


def test_tolerance_applies_on_the_y_axis_too():
    # x outside, y = 0.2 inside: the frontier's loss at 0.2 is 3.1; 3.095 is within 0.01 of it
    assert frontier_position((3.095, 0.2), [(3.0, 0.30), (3.2, 0.10)], 0.01) == "on"
    assert frontier_position((3.05, 0.2), [(3.0, 0.30), (3.2, 0.10)], 0.01) == "beyond"
    assert frontier_position((3.05, 0.2), [], 0.01) == "undecided"


def test_mark_records_and_write_frontier(tmp_path):
    recs = [
        {"strategy": "ncl", "lr": 1e-4, "in_domain_loss": 2.0, "forgetting": 0.30},
        {"strategy": "ncl", "lr": 5e-5, "in_domain_loss": 2.2, "forgetting": 0.10},
        {"strategy": "das", "lr": 1e-4, "in_domain_loss": 2.1, "forgetting": 0.05},  # below the interpolation 0.20
        {"strategy": "das", "lr": 5e-5, "in_domain_loss": 2.3, "forgetting": 0.12},  # dominated by ncl 5e-5
        {"strategy": "das", "lr": 1e-5, "in_domain_loss": 2.5, "forgetting": 0.01},  # past the lowest-lr end
        {"strategy": "das", "lr": 2e-3, "in_domain_loss": 2.1, "forgetting": 0.0, "complete": False},  # cut short
    ]
    marked = mark_beyond_frontier(recs)
    assert [r["frontier_position"] for r in marked] == [None, None, "beyond", "behind", "undecided", None]
    assert [r["beyond_frontier"] for r in marked] == [None, None, True, False, None, None]
    dirs = []
    for i, r in enumerate(recs[:5]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        res = {"run_name": r["strategy"], "learning_rate": r["lr"], "complete": True, "bwt": 0.0,
               "in_domain_loss": r["in_domain_loss"], "forgetting": r["forgetting"], "general_loss_increase": 0.0,
               "final_mean_loss": 2.0}
        (d / "results.json").write_text(json.dumps(res))
        dirs.append(d)
    payload = write_frontier(tmp_path / "out", dirs)  # the call continual/pretrain.py makes
    assert [r["frontier_position"] for r in payload["runs"]] == [None, None, "beyond", "behind", "undecided"]
    md = (tmp_path / "out" / "frontier.md").read_text()
    assert md.count("**beyond**") == 1 and "undecided" in md
