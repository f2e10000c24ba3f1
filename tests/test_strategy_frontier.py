"""The one frontier definition (continual.frontier), on hand-made points."""

from __future__ import annotations

import json

import pytest

from hf_softmask.continual.comparison import frontier_position as comparison_position
from hf_softmask.continual.pretraining.frontier import (
    frontier_position,
    mark_beyond_frontier,
    pareto_front,
    write_frontier,
)

# (x = in-domain loss, y = forgetting); (3.3, 0.20) is dominated by (3.2, 0.10)
PLAIN = [(3.0, 0.30), (3.2, 0.10), (3.4, 0.05), (3.3, 0.20)]


def test_pareto_front_drops_dominated_points():
    assert pareto_front(PLAIN) == [(3.0, 0.30), (3.2, 0.10), (3.4, 0.05)]


@pytest.mark.parametrize(
    "point, want",
    [
        ((3.1, 0.10), "beyond"),  # inside the x range: the frontier at 3.1 is 0.20
        ((3.1, 0.195), "on"),  # within the tolerance of 0.20
        ((3.1, 0.25), "behind"),
        ((3.3, 0.06), "beyond"),  # frontier at 3.3 is 0.075
        ((2.9, 0.25), "beyond"),  # x outside, y inside: at forgetting 0.25 the frontier's loss is 3.05
        ((2.9, 0.35), "undecided"),  # outside both ranges: a plain run at a higher learning rate would decide
        ((3.6, 0.01), "undecided"),  # past the lowest-lr end: what a lower learning rate also buys
        ((3.6, 0.04), "undecided"),
        ((3.6, 0.06), "behind"),  # (3.4, 0.05) is better on both axes, wherever the point lies
        ((3.5, 0.20), "behind"),  # x outside, y inside: at forgetting 0.2 the frontier's loss is 3.1
        ((2.8, 0.01), "undecided"),  # dominates every plain run but lies outside both ranges
        ((3.2, float("nan")), "undecided"),
    ],
)
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
        res = {
            "run_name": r["strategy"],
            "learning_rate": r["lr"],
            "complete": True,
            "bwt": 0.0,
            "in_domain_loss": r["in_domain_loss"],
            "forgetting": r["forgetting"],
            "general_loss_increase": 0.0,
            "final_mean_loss": 2.0,
        }
        (d / "results.json").write_text(json.dumps(res))
        dirs.append(d)
    payload = write_frontier(tmp_path / "out", dirs)  # the call continual/pretraining/sweep.py makes
    assert [r["frontier_position"] for r in payload["runs"]] == [None, None, "beyond", "behind", "undecided"]
    md = (tmp_path / "out" / "frontier.md").read_text()
    assert md.count("**beyond**") == 1 and "undecided" in md
    assert (tmp_path / "out" / "frontier.png").read_bytes().startswith(b"\x89PNG")
    write_frontier(tmp_path / "bare", dirs, plots=False)  # --plots false: no PNG
    assert (tmp_path / "bare" / "frontier.json").is_file() and not (tmp_path / "bare" / "frontier.png").exists()


def _blocks_results(label, lr, in_domain, after, noise, seed=0, n=8):
    """results.json of a 2-domain run with per-block losses: domain 1 at ``in_domain`` after its training and
    ``after`` + per-block ``noise`` (alternating signs, mean 0) after domain 2; domain 2 at ``in_domain``."""
    offs = [0.1 * (b % 4) for b in range(n)]  # block difficulty, the same for every run (cancels in pairs)
    wiggle = [noise * (1 if b % 2 else -1) for b in range(n)]
    d0 = [[3.0 + o for o in offs], [in_domain + o for o in offs], [after + o + w for o, w in zip(offs, wiggle)]]
    d1 = [[3.0 + o for o in offs], [3.0 + o for o in offs], [in_domain + o for o in offs]]
    return {
        "run_name": label,
        "learning_rate": lr,
        "complete": True,
        "seed": seed,
        "bwt": 0.0,
        "in_domain_loss": in_domain + sum(offs) / n,
        "forgetting": after - in_domain,
        "general_loss_increase": 0.0,
        "final_mean_loss": 2.0,
        "eval_block_losses": [[d0[s], d1[s]] for s in range(3)],
        "general_block_losses": [[3.0 + o for o in offs]] * 3,
    }


def test_frontier_intervals_decide_beyond_and_seeds_form_one_row(tmp_path):
    runs = {
        "ncl_a": _blocks_results("ncl", 1e-3, 2.0, 2.3, 0.0),
        "ncl_b": _blocks_results("ncl", 1e-4, 2.2, 2.3, 0.0),
        # forgetting 0.05 where the frontier has 0.2: beyond, with little block noise -> the interval agrees
        "x_s0": _blocks_results("x", 1e-3, 2.1, 2.15, 0.01, seed=0),
        "x_s1": _blocks_results("x", 1e-3, 2.1, 2.15, 0.02, seed=1),
        # the same point, but blocks disagreeing by +-1 nat: the interval of the gap contains 0 -> not beyond
        "y": _blocks_results("y", 1e-3, 2.1, 2.15, 1.0),
    }
    dirs = []
    for name, res in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
        dirs.append(tmp_path / name)
    payload = write_frontier(tmp_path / "out", dirs, n_resamples=500)
    by = {r["strategy"]: r for r in payload["runs"]}
    design = payload["design"]
    assert (design["resamples"], design["confidence"], design["bootstrap_seed"]) == (500, 0.95, 0)
    assert design["resampling_unit"] == "block"  # these results name no documents
    assert len(payload["runs"]) == 4 and by["x"]["seeds"] == [0, 1] and len(by["x"]["run"]) == 2
    assert by["x"]["forgetting_per_seed"] == [pytest.approx(0.05)] * 2
    gx, gy = by["x"]["forgetting_gap"], by["y"]["forgetting_gap"]
    assert gx["estimate"] == pytest.approx(-0.15) and gy["estimate"] == pytest.approx(-0.15)
    assert gx["high"] < 0 and by["x"]["beyond_frontier"] is True
    assert gy["low"] < 0 < gy["high"] and by["y"]["beyond_frontier"] is False
    assert by["y"]["frontier_position"] == "beyond"  # the point rule alone would have called it beyond
    ci = by["x"]["intervals"]["forgetting"]
    assert ci["low"] <= 0.05 <= ci["high"] and by["ncl"]["intervals"]["in_domain_loss"]["low"] > 0
    md = (tmp_path / "out" / "frontier.md").read_text()
    assert md.count("**beyond**") == 1 and "| y | 0.001 |" in md and "inside" in md
