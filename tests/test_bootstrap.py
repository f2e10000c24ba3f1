"""Paired bootstrap intervals against a hand computation (seeded resamples redrawn by hand), the pairing and the
frontier rule on constructed runs, the normal-approximation width and token budget, and per-block losses that
average back to the runner's held-out loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_softmask.bootstrap import (
    RunBlocks,
    block_losses,
    blocks_for_halfwidth,
    frontier_gap_ci,
    frontier_intervals,
    frontier_verdict,
    metric_ci,
    paired_difference_ci,
    run_metrics,
)
from hf_softmask.continual.evaluation import lm_eval_loss
from hf_softmask.continual.frontier import write_frontier
from tests.testing_utils import random_lm_batches, tiny_bert, tiny_gpt2

Z95 = 1.959963984540054


def _random_run(rng, T, counts, n_general):
    loss = [[list(rng.normal(3.0, 0.5, counts[j])) for j in range(T)] for _ in range(T + 1)]
    general = [list(rng.normal(3.0, 0.5, n_general)) for _ in range(T + 1)]
    return loss, general


def _quantile(sorted_d, q):
    pos = (len(sorted_d) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_d[lo] + (pos - lo) * (sorted_d[hi] - sorted_d[lo])


def _hand_metrics(loss, general, idx):
    """The three metrics of one resample by explicit loops: idx[j] = block indices of domain j, idx[-1] general."""
    T = len(loss[0])
    M = [[sum(loss[s][j][b] for b in idx[j]) / len(idx[j]) for j in range(T)] for s in range(T + 1)]
    G = [sum(general[s][b] for b in idx[-1]) / len(idx[-1]) for s in range(T + 1)]
    in_domain = sum(M[i][i - 1] for i in range(1, T + 1)) / T
    forg = sum(M[T][j] - min(M[s][j] for s in range(j + 1, T)) for j in range(T - 1)) / (T - 1)
    return {"in_domain_loss": in_domain, "forgetting": forg, "general_loss_increase": G[T] - G[0]}


def test_paired_interval_equals_hand_computation():
    T, counts, n_g, R, seed, conf = 3, [3, 4, 2], 3, 7, 11, 0.8
    rng = np.random.default_rng(0)
    a, b = _random_run(rng, T, counts, n_g), _random_run(rng, T, counts, n_g)
    got = paired_difference_ci(RunBlocks(*a), RunBlocks(*b), n_resamples=R, confidence=conf, seed=seed)
    # the documented draw: one generator, domains in order, general text last, [R, n] each
    gen = np.random.default_rng(seed)
    draws = [gen.integers(0, n, size=(R, n)) for n in counts + [n_g]]
    full = [list(range(n)) for n in counts + [n_g]]
    for m in ("in_domain_loss", "forgetting", "general_loss_increase"):
        diffs = sorted(
            _hand_metrics(*a, [d[r] for d in draws])[m] - _hand_metrics(*b, [d[r] for d in draws])[m] for r in range(R)
        )
        assert got[m]["estimate"] == pytest.approx(_hand_metrics(*a, full)[m] - _hand_metrics(*b, full)[m], abs=1e-12)
        assert got[m]["low"] == pytest.approx(_quantile(diffs, 0.1), abs=1e-12), m
        assert got[m]["high"] == pytest.approx(_quantile(diffs, 0.9), abs=1e-12), m
    # the point metrics are the runner's definitions
    point = run_metrics(RunBlocks(*a))
    assert point["forgetting"] == pytest.approx(_hand_metrics(*a, full)["forgetting"], abs=1e-12)


def test_pairing_cancels_block_difficulty():
    """Run b = run a + 0.02 nats everywhere (+ tiny noise), blocks of very different difficulty: the paired interval
    of the in-domain difference is tight around -0.02 and excludes 0."""
    rng = np.random.default_rng(1)
    T, n = 2, 30
    difficulty = [rng.normal(3.0, 1.0, n) for _ in range(T)]
    g_difficulty = rng.normal(3.0, 1.0, n)

    def run(shift):
        loss = [[list(difficulty[j] + shift + rng.normal(0, 0.002, n)) for j in range(T)] for _ in range(T + 1)]
        return RunBlocks(loss, [list(g_difficulty + shift + rng.normal(0, 0.002, n)) for _ in range(T + 1)])

    ci = paired_difference_ci(run(0.0), run(0.02), n_resamples=500)["in_domain_loss"]
    assert ci["high"] < 0 and ci["low"] > -0.03 and abs(ci["estimate"] + 0.02) < 0.002
    # an unpaired bootstrap of the same two means would be ~ 1.96 * sqrt(2) * 1.0 / sqrt(30) ~ 0.5 wide: 100x wider
    assert ci["high"] - ci["low"] < 0.005


def _designed_run(x, f, noise, rng, n=20):
    """T = 2: in-domain loss x (M[1][0] = M[2][1] = x), forgetting f (M[2][0] = x + f), on shared block noise."""

    def blocks(mean):
        return list(mean + noise + rng.normal(0, 0.001, n))

    loss = [[blocks(3.0), blocks(3.0)], [blocks(x), blocks(3.0)], [blocks(x + f), blocks(x)]]
    return RunBlocks(loss, [blocks(3.0), blocks(3.0), blocks(3.0)])


def test_frontier_gap_and_verdicts():
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 0.3, 20)
    ncl = [_designed_run(x, f, noise, rng) for x, f in [(2.0, 0.5), (2.2, 0.3), (2.4, 0.1)]]
    beyond = frontier_gap_ci(_designed_run(2.1, 0.1, noise, rng), ncl, n_resamples=300)
    # frontier at in-domain 2.1: halfway between (2.0, 0.5) and (2.2, 0.3) = 0.4; gap 0.1 - 0.4 = -0.3
    assert beyond["forgetting"]["estimate"] == pytest.approx(-0.3, abs=0.003)
    assert beyond["forgetting"]["verdict"] == "beyond"
    assert beyond["general_loss_increase"]["verdict"] == "inside"  # general text unchanged by every run
    on_line = frontier_gap_ci(_designed_run(2.3, 0.2, noise, rng), ncl, n_resamples=300)["forgetting"]
    assert abs(on_line["estimate"]) < 0.003 and on_line["verdict"] == "inside"
    worse = frontier_gap_ci(_designed_run(2.3, 0.4, noise, rng), ncl, n_resamples=300)["forgetting"]
    assert worse["verdict"] == "behind"
    outside = frontier_gap_ci(_designed_run(1.5, 0.0, noise, rng), ncl, n_resamples=300)["forgetting"]
    assert outside["verdict"] is None and outside["undefined_fraction"] == 1.0
    assert frontier_verdict({"estimate": 0.1, "low": -0.01, "high": 0.2, "undefined_fraction": 0.06}) is None
    with pytest.raises(ValueError, match=">= 2 ncl runs"):
        frontier_gap_ci(ncl[0], ncl[:1])


def test_frontier_table_entries_from_results_and_seeds():
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 0.3, 20)

    def as_results(run):
        return {
            "eval_block_losses": [[list(run.domain[j][s]) for j in range(2)] for s in range(3)],
            "general_block_losses": run.general.tolist(),
            "eval_block_tokens": [[63] * 20, [63] * 20],
            "general_block_tokens": [63] * 20,
        }

    runs = {
        f"ncl_lr{x}": RunBlocks.from_results(as_results(_designed_run(x, f, noise, rng)))
        for x, f in [(2.0, 0.5), (2.2, 0.3), (2.4, 0.1)]
    }
    seeds = [_designed_run(2.1, 0.1, noise, rng) for _ in range(3)]
    runs["das_lr1e-4"] = RunBlocks.mean(seeds)
    np.testing.assert_allclose(runs["das_lr1e-4"].domain[0], np.mean([r.domain[0] for r in seeds], axis=0))
    table = frontier_intervals(runs, [k for k in runs if k.startswith("ncl")], n_resamples=200)
    assert table["das_lr1e-4"]["beyond_frontier"] is True
    assert table["das_lr1e-4"]["forgetting_gap"]["estimate"] == pytest.approx(-0.3, abs=0.003)
    assert "beyond_frontier" not in table["ncl_lr2.0"]
    own = metric_ci(runs["ncl_lr2.2"], n_resamples=200)["in_domain_loss"]
    assert own["estimate"] == run_metrics(runs["ncl_lr2.2"])["in_domain_loss"]
    assert own["low"] < own["estimate"] < own["high"]
    with pytest.raises(KeyError, match="per-block losses"):
        RunBlocks.from_results({"loss_matrix": []})
    with pytest.raises(KeyError, match="not among the runs"):
        frontier_intervals(runs, ["ncl_lr9"])


def test_blocks_for_halfwidth_formula():
    got = blocks_for_halfwidth([1.0, 2.0, 3.0, 4.0], halfwidth=0.01, tokens_per_block=256)
    var = ((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (3 - 2.5) ** 2 + (4 - 2.5) ** 2) / 3
    assert got["z"] == pytest.approx(Z95, abs=1e-9)
    assert got["blocks"] == math.ceil(Z95**2 * var / 0.01**2) and got["tokens"] == got["blocks"] * 256
    # a mean over two domains: pooled variance (var + 4) / 2 over 2 * n blocks
    two = blocks_for_halfwidth([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 6.0]], halfwidth=0.05)
    assert two["blocks"] == math.ceil(Z95**2 * (var + 4.0) / 2 / (2 * 0.05**2))
    with pytest.raises(ValueError, match=">= 2 blocks"):
        blocks_for_halfwidth([[1.0], [2.0, 3.0]])


def test_bootstrap_width_matches_normal_approximation():
    """T = 1 run against an all-zero run: the in-domain difference is the mean of n = 400 block losses; its 95%
    bootstrap interval is ~ 2 * 1.96 * s / sqrt(n) wide, and the budget formula inverts it."""
    rng = np.random.default_rng(3)
    n = 400
    values = rng.normal(3.0, 0.5, n)
    run = RunBlocks([[list(values)], [list(values)]], [[0.0] * 4, [0.0] * 4])
    zero = RunBlocks([[[0.0] * n], [[0.0] * n]], [[0.0] * 4, [0.0] * 4])
    ci = paired_difference_ci(run, zero, n_resamples=4000, seed=0)["in_domain_loss"]
    s = values.std(ddof=1)
    normal_width = 2 * Z95 * s / math.sqrt(n)
    assert ci["high"] - ci["low"] == pytest.approx(normal_width, rel=0.08)
    assert blocks_for_halfwidth(values, halfwidth=(ci["high"] - ci["low"]) / 2)["blocks"] == pytest.approx(n, rel=0.2)


def test_run_blocks_refuses_incomplete_and_unpaired_runs():
    rng = np.random.default_rng(4)
    loss, general = _random_run(rng, 2, [3, 3], 3)
    with pytest.raises(ValueError, match="T \\+ 1 stages"):
        RunBlocks(loss[:2], general[:2])
    other = RunBlocks(*_random_run(rng, 2, [3, 4], 3))
    with pytest.raises(ValueError, match="same evaluation blocks"):
        paired_difference_ci(RunBlocks(loss, general), other, n_resamples=10)


@pytest.mark.parametrize("causal", [True, False], ids=["clm-gpt2", "mlm-bert"])
def test_block_losses_average_back_to_the_held_out_loss(causal):
    model = tiny_gpt2() if causal else tiny_bert()
    batches = random_lm_batches(3, batch_size=4, seq_len=12, seed=5)
    g = torch.Generator().manual_seed(0)
    for b in batches:  # unlabelled positions, as padding (clm) or unmasked tokens (mlm) leave them
        b["labels"][torch.rand(b["labels"].shape, generator=g) < (0.2 if causal else 0.8)] = -100
    losses, tokens = block_losses(model, batches, causal)
    shift = 1 if causal else 0
    assert len(losses) == 12 and sum(tokens) == sum(int((b["labels"][:, shift:] != -100).sum()) for b in batches)
    assert all(loss == 0.0 for loss, t in zip(losses, tokens) if t == 0)  # a row without labels weighs nothing
    assert np.average(losses, weights=tokens) == pytest.approx(lm_eval_loss(model, batches, causal), rel=1e-5)


def _strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity (what JSON readers other than Python's do)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _results_dirs(root) -> list:
    """Run directories holding results.json with per-block losses: three ncl learning rates and one das run whose
    in-domain loss (1.5) is left of the ncl range (2.0-2.4)."""
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 0.3, 20)
    dirs = []
    for name, x, f in [("ncl", 2.0, 0.5), ("ncl", 2.2, 0.3), ("ncl", 2.4, 0.1), ("das", 1.5, 0.0)]:
        run = _designed_run(x, f, noise, rng)
        point = run_metrics(run)
        results = {
            "strategy": name,
            "run_name": name,
            "learning_rate": x,
            "complete": True,
            "bwt": -point["forgetting"],
            "final_mean_loss": x,
            **point,
            "eval_block_losses": [[list(run.domain[j][s]) for j in range(2)] for s in range(3)],
            "general_block_losses": run.general.tolist(),
            "eval_block_tokens": [[63] * 20, [63] * 20],
            "general_block_tokens": [63] * 20,
        }
        d = root / f"{name}_{x}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(results))
        dirs.append(d)
    return dirs


def test_frontier_json_is_strict_when_a_run_lies_outside_the_frontier(tmp_path):
    dirs = _results_dirs(tmp_path)
    write_frontier(tmp_path, dirs, n_resamples=200)
    payload = _strict_json((tmp_path / "frontier.json").read_text())
    das = next(r for r in payload["runs"] if r["strategy"] == "das")
    # in-domain loss 1.5 is left of the frontier's range (2.0-2.4): no gap exists, so no number is invented.
    assert das["forgetting_gap"]["estimate"] is None and das["forgetting_gap"]["verdict"] is None
    assert das["beyond_frontier"] is None
    assert "outside the frontier's range" in (tmp_path / "frontier.md").read_text()


def test_frontier_gap_ignores_a_dominated_plain_run():
    """The frontier is the curve through the non-dominated ncl runs (the point rule's): a plain run that is worse on
    both axes than another one is not part of it, in the estimate and in every resample."""
    rng = np.random.default_rng(11)
    noise = rng.normal(0, 0.3, 20)
    # (2.2, 0.9) is dominated by (2.0, 0.5): the frontier is the segment (2.0, 0.5) - (2.4, 0.1).
    ncl = [_designed_run(x, f, noise, rng) for x, f in [(2.0, 0.5), (2.2, 0.9), (2.4, 0.1)]]
    gap = frontier_gap_ci(_designed_run(2.2, 0.2, noise, rng), ncl, n_resamples=300)["forgetting"]
    # at in-domain 2.2 the frontier is 0.3: gap 0.2 - 0.3 = -0.1 (through the dominated run it would be -0.7)
    assert gap["estimate"] == pytest.approx(-0.1, abs=0.003)
    assert -0.11 < gap["low"] < gap["high"] < -0.09 and gap["verdict"] == "beyond"
    behind = frontier_gap_ci(_designed_run(2.2, 0.5, noise, rng), ncl, n_resamples=300)["forgetting"]
    assert behind["estimate"] == pytest.approx(0.2, abs=0.003) and behind["verdict"] == "behind"
    # (2.4, 0.3) is dominated by (2.2, 0.1): between 2.2 and 2.4 the frontier stays at 0.1 (flat), not 0.2.
    ncl = [_designed_run(x, f, noise, rng) for x, f in [(2.0, 0.5), (2.2, 0.1), (2.4, 0.3)]]
    flat = frontier_gap_ci(_designed_run(2.3, 0.05, noise, rng), ncl, n_resamples=300)["forgetting"]
    assert flat["estimate"] == pytest.approx(-0.05, abs=0.003) and flat["verdict"] == "beyond"
    outside = frontier_gap_ci(_designed_run(2.5, 0.0, noise, rng), ncl, n_resamples=300)["forgetting"]
    assert outside["estimate"] is None and outside["verdict"] is None


def test_frontier_of_finished_runs_from_absolute_globs(tmp_path):
    """``--frontier_runs`` takes directories and globs, absolute or relative; a pattern that matches no finished
    run is an error naming it (it used to be skipped, or to crash on an absolute glob)."""
    from hf_softmask.continual import parse_config, run_continual_pretraining

    _results_dirs(tmp_path / "sweep")
    out = tmp_path / "table"
    runs = f"{tmp_path}/sweep/ncl_*,{tmp_path}/sweep/das_1.5"
    args = parse_config(["--frontier_runs", runs, "--output_dir", str(out)])
    payload = run_continual_pretraining(args)
    assert sorted(r["strategy"] for r in payload["runs"]) == ["das", "ncl", "ncl", "ncl"]
    assert (out / "frontier.md").is_file()
    missing = f"{tmp_path}/sweep/lora_*"
    args = parse_config(["--frontier_runs", f"{tmp_path}/sweep/ncl_*,{missing}", "--output_dir", str(out)])
    with pytest.raises(FileNotFoundError, match="lora_"):
        run_continual_pretraining(args)
