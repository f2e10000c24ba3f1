"""The frontier's statistics against hand computations: the document resample redrawn by hand, the seed jackknife,
the t interval with its degrees of freedom, Holm's adjustment, the frontier rule on constructed runs, fragile
verdicts, the token budget, and per-block losses that average back to the runner's held-out loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2, t

from hf_softmask.continual.pretraining.evaluation import lm_eval_loss
from hf_softmask.continual.pretraining.frontier import write_frontier
from hf_softmask.evaluation.bootstrap import (
    RunBlocks,
    Study,
    block_losses,
    blocks_for_halfwidth,
    frontier_verdicts,
    holm,
    run_metrics,
)
from tests.testing_utils import random_lm_batches, tiny_bert, tiny_gpt2

Z95 = 1.959963984540054


def _random_run(rng, T, counts, n_general, docs=None, seed=None):
    loss = [[list(rng.normal(3.0, 0.5, counts[j])) for j in range(T)] for _ in range(T + 1)]
    general = [list(rng.normal(3.0, 0.5, n_general)) for _ in range(T + 1)]
    if docs is None:
        return RunBlocks(loss, general, seed=seed)
    return RunBlocks(loss, general, docs=docs[:-1], general_docs=docs[-1], seed=seed)


def _hand_metrics(run: RunBlocks, blocks):
    """The three metrics by explicit loops over a list of (block index) per group, repeats counting again, each block
    weighted by its label tokens."""
    T = run.num_domains

    def mean(values, w, idx):
        return sum(values[b] * w[b] for b in idx) / sum(w[b] for b in idx)

    M = [[mean(run.domain[j][s], run.domain_w[j], blocks[j]) for j in range(T)] for s in range(T + 1)]
    G = [mean(run.general[s], run.general_w, blocks[-1]) for s in range(T + 1)]
    in_domain = sum(M[i][i - 1] for i in range(1, T + 1)) / T
    forg = sum(M[T][j] - min(M[s][j] for s in range(j + 1, T)) for j in range(T - 1)) / (T - 1)
    return {"in_domain_loss": in_domain, "forgetting": forg, "general_loss_increase": G[T] - G[0]}


def test_document_resample_equals_hand_computation():
    """Documents of 1-3 blocks, token weights: every resample draws documents with the documented generator, and a
    block counts as often as its document was drawn; the document variance, the t interval (D - 1 degrees of
    freedom with one seed) and the p-value follow by hand."""
    rng = np.random.default_rng(0)
    docs = [["a", "a", "b", "c", "c", "c"], ["x", "y", "y", "z"], ["g1", "g2", "g2"]]
    counts = [len(d) for d in docs]
    a = _random_run(rng, 2, counts[:2], counts[2], docs)
    b = _random_run(rng, 2, counts[:2], counts[2], docs)
    tokens = [rng.integers(10, 60, n).astype(float) for n in counts]  # the same blocks, so the same label tokens
    for run in (a, b):
        run.domain_w, run.general_w = tokens[:2], tokens[2]
    R, seed, conf = 9, 3, 0.9
    study = Study({"a": [a], "b": [b]}, n_resamples=R, confidence=conf, seed=seed)
    got = study.difference("a", "b")
    # the documented draw: one generator; per group (domains in order, general last) the sorted unique documents,
    # integers(0, D, size=(R, D))
    gen = np.random.default_rng(seed)
    draws = []
    for d in docs:
        names = sorted(set(d))
        draws.append([[names[i] for i in row] for row in gen.integers(0, len(names), size=(R, len(names)))])
    full = [list(range(n)) for n in counts]
    for m in ("in_domain_loss", "forgetting", "general_loss_increase"):
        diffs = []
        for r in range(R):
            blocks = [[b for doc in draws[g][r] for b, name in enumerate(docs[g]) if name == doc] for g in range(3)]
            diffs.append(_hand_metrics(a, blocks)[m] - _hand_metrics(b, blocks)[m])
        est = _hand_metrics(a, full)[m] - _hand_metrics(b, full)[m]
        v_doc = float(np.var(diffs, ddof=1))
        # degrees of freedom: Satterthwaite over the groups, each resampled alone with the same draws
        parts = []
        for g in range(3):
            alone = []
            for r in range(R):
                blocks = [
                    [b for doc in draws[h][r] for b, name in enumerate(docs[h]) if name == doc] if h == g else full[h]
                    for h in range(3)
                ]
                alone.append(_hand_metrics(a, blocks)[m] - _hand_metrics(b, blocks)[m])
            parts.append((np.var(alone, ddof=1), len(set(docs[g])) - 1))
        df = sum(v for v, _ in parts) ** 2 / sum(v * v / d for v, d in parts)
        half = t.ppf((1 + conf) / 2, df) * math.sqrt(v_doc)
        ci = got[m]
        assert ci["estimate"] == pytest.approx(est, abs=1e-12), m
        assert ci["var_documents"] == pytest.approx(v_doc, rel=1e-9), m
        assert ci["df"] == pytest.approx(df, rel=1e-9) and ci["var_seeds"] is None
        assert (ci["low"], ci["high"]) == pytest.approx((est - half, est + half), abs=1e-12), m
        assert ci["p"] == pytest.approx(2 * t.sf(abs(est) / math.sqrt(v_doc), df), rel=1e-9), m
    assert run_metrics(a)["forgetting"] == pytest.approx(_hand_metrics(a, full)["forgetting"], abs=1e-12)


def test_seed_jackknife_and_degrees_of_freedom_by_hand():
    """Three seeds per row: the seed variance of a row's metric is the variance of its per-seed values over 3 (the
    jackknife of a mean), of a difference the same of per-seed differences (seeds paired across rows); the degrees
    of freedom are Welch-Satterthwaite's with the median-corrected seed variance, at least K - 1."""
    rng = np.random.default_rng(1)
    docs = [[f"d{i // 2}" for i in range(8)], [f"e{i // 2}" for i in range(8)], [f"g{i}" for i in range(4)]]
    rows = {name: [_random_run(rng, 2, [8, 8], 4, docs, seed=s) for s in (0, 1, 2)] for name in ("a", "b")}
    study = Study(rows, n_resamples=50, seed=0)
    per_seed_a = [run_metrics(r)["in_domain_loss"] for r in rows["a"]]
    ci = study.metric_intervals("a")["in_domain_loss"]
    assert ci["estimate"] == pytest.approx(np.mean(per_seed_a), abs=1e-12)
    assert ci["var_seeds"] == pytest.approx(np.var(per_seed_a, ddof=1) / 3, rel=1e-9)
    diff = study.difference("a", "b")["in_domain_loss"]
    per_seed_d = [run_metrics(x)["in_domain_loss"] - run_metrics(y)["in_domain_loss"] for x, y in zip(*rows.values())]
    assert diff["var_seeds"] == pytest.approx(np.var(per_seed_d, ddof=1) / 3, rel=1e-9)
    vd, vs = diff["var_documents"], diff["var_seeds"]
    m = chi2.ppf(0.5, 2) / 2
    nu = max(2.0, (vd + vs) ** 2 / (vd**2 / 3 + (vs / m) ** 2 / 2))  # 4 documents per group: 3 df
    assert diff["df"] == pytest.approx(nu, rel=1e-9)
    half = t.ppf(0.975, nu) * math.sqrt(vd + vs)
    assert diff["high"] - diff["low"] == pytest.approx(2 * half, rel=1e-9)
    # rows without a shared seed (or seed_level off) carry no training noise
    assert Study(rows, n_resamples=50, seed_level=False).difference("a", "b")["in_domain_loss"]["var_seeds"] is None


def test_pairing_cancels_block_difficulty():
    """Run b = run a + 0.02 nats everywhere (+ tiny noise), documents of very different difficulty: the paired
    interval of the in-domain difference is tight around -0.02 and excludes 0."""
    rng = np.random.default_rng(1)
    T, n = 2, 30
    difficulty = [rng.normal(3.0, 1.0, n) for _ in range(T)]
    g_difficulty = rng.normal(3.0, 1.0, n)
    docs = [[f"{j}/{b}" for b in range(n)] for j in range(T + 1)]

    def run(shift):
        loss = [[list(difficulty[j] + shift + rng.normal(0, 0.002, n)) for j in range(T)] for _ in range(T + 1)]
        general = [list(g_difficulty + shift + rng.normal(0, 0.002, n)) for _ in range(T + 1)]
        return RunBlocks(loss, general, docs=docs[:-1], general_docs=docs[-1])

    ci = Study({"a": [run(0.0)], "b": [run(0.02)]}, n_resamples=500).difference("a", "b")["in_domain_loss"]
    assert ci["high"] < 0 and ci["low"] > -0.03 and abs(ci["estimate"] + 0.02) < 0.002
    # an unpaired interval of the same two means would be ~ 1.96 * sqrt(2) * 1.0 / sqrt(30) ~ 0.5 wide: 100x wider
    assert ci["high"] - ci["low"] < 0.005


def _designed_run(x, f, noise, rng, n=20, docs=None, seed=None):
    """T = 2: in-domain loss x (M[1][0] = M[2][1] = x), forgetting f (M[2][0] = x + f), on shared block noise."""

    def blocks(mean):
        return list(mean + noise + rng.normal(0, 0.001, n))

    loss = [[blocks(3.0), blocks(3.0)], [blocks(x), blocks(3.0)], [blocks(x + f), blocks(x)]]
    docs = docs or [[f"{g}/{b}" for b in range(n)] for g in range(3)]
    return RunBlocks(loss, [blocks(3.0), blocks(3.0), blocks(3.0)], docs=docs[:2], general_docs=docs[2], seed=seed)


def _study(runs: dict, **kw) -> Study:
    return Study({k: v if isinstance(v, list) else [v] for k, v in runs.items()}, **kw)


def test_frontier_gap_and_raw_verdicts():
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 0.3, 20)
    ncl = {f"ncl{x}": _designed_run(x, f, noise, rng) for x, f in [(2.0, 0.5), (2.2, 0.3), (2.4, 0.1)]}
    rows = {
        "beyond": _designed_run(2.1, 0.1, noise, rng),
        "on_line": _designed_run(2.3, 0.2, noise, rng),
        "worse": _designed_run(2.3, 0.4, noise, rng),
        "outside": _designed_run(1.5, 0.0, noise, rng),
    }
    study = _study({**ncl, **rows}, n_resamples=300)
    beyond = study.gap("beyond", list(ncl))
    # frontier at in-domain 2.1: halfway between (2.0, 0.5) and (2.2, 0.3) = 0.4; gap 0.1 - 0.4 = -0.3
    assert beyond["estimate"] == pytest.approx(-0.3, abs=0.003) and beyond["verdict"] == "beyond"
    assert study.gap("beyond", list(ncl), "general_loss_increase")["verdict"] == "inside"  # general text unchanged
    on_line = study.gap("on_line", list(ncl))
    assert abs(on_line["estimate"]) < 0.003 and on_line["verdict"] == "inside"
    assert study.gap("worse", list(ncl))["verdict"] == "behind"
    outside = study.gap("outside", list(ncl))
    assert outside["verdict"] is None and outside["undefined_fraction"] == 1.0
    with pytest.raises(ValueError, match=">= 2 ncl rows"):
        study.gap("beyond", ["ncl2.0"])


def test_frontier_gap_ignores_a_dominated_plain_run():
    """The frontier is the curve through the non-dominated ncl rows (the point rule's): a plain row that is worse on
    both axes than another one is not part of it, in the estimate and in every resample."""
    rng = np.random.default_rng(11)
    noise = rng.normal(0, 0.3, 20)
    # (2.2, 0.9) is dominated by (2.0, 0.5): the frontier is the segment (2.0, 0.5) - (2.4, 0.1).
    ncl = {f"n{i}": _designed_run(x, f, noise, rng) for i, (x, f) in enumerate([(2.0, 0.5), (2.2, 0.9), (2.4, 0.1)])}
    study = _study(
        {**ncl, "a": _designed_run(2.2, 0.2, noise, rng), "b": _designed_run(2.2, 0.5, noise, rng)}, n_resamples=300
    )
    gap = study.gap("a", list(ncl))
    # at in-domain 2.2 the frontier is 0.3: gap 0.2 - 0.3 = -0.1 (through the dominated run it would be -0.7)
    assert gap["estimate"] == pytest.approx(-0.1, abs=0.003)
    assert -0.11 < gap["low"] < gap["high"] < -0.09 and gap["verdict"] == "beyond"
    behind = study.gap("b", list(ncl))
    assert behind["estimate"] == pytest.approx(0.2, abs=0.003) and behind["verdict"] == "behind"
    # (2.4, 0.3) is dominated by (2.2, 0.1): between 2.2 and 2.4 the frontier stays at 0.1 (flat), not 0.2.
    ncl = {f"n{i}": _designed_run(x, f, noise, rng) for i, (x, f) in enumerate([(2.0, 0.5), (2.2, 0.1), (2.4, 0.3)])}
    study = _study(
        {**ncl, "a": _designed_run(2.3, 0.05, noise, rng), "o": _designed_run(2.5, 0.0, noise, rng)}, n_resamples=300
    )
    flat = study.gap("a", list(ncl))
    assert flat["estimate"] == pytest.approx(-0.05, abs=0.003) and flat["verdict"] == "beyond"
    outside = study.gap("o", list(ncl))
    assert outside["estimate"] is None and outside["verdict"] is None


def test_holm_by_hand():
    """Four p-values: sorted 0.01, 0.02, 0.03, 0.2 -> 4 * 0.01, max(0.04, 3 * 0.02), max(0.06, 2 * 0.03), max(., 0.2);
    None stays out of the family (m = 4, not 5)."""
    got = holm({"a": 0.03, "b": 0.01, "c": 0.2, "d": 0.02, "e": None})
    assert got == pytest.approx({"b": 0.04, "d": 0.06, "a": 0.06, "c": 0.2, "e": None})
    assert holm({"x": 0.04, "y": 0.03}) == pytest.approx({"x": 0.06, "y": 0.06})  # monotone: never below an earlier
    assert holm({"x": 0.6, "y": 0.5}) == {"x": 1.0, "y": 1.0}  # capped at 1


def test_adjusted_verdicts_primary_family_and_fragile_rule():
    """The primary family (named in advance) and the other rows are adjusted apart. Among the others, a row beyond
    by its raw interval (p ~ 0.03) has the smallest p of three, so Holm multiplies it by 3 and it reads inside. In
    the primary family, a row that reads beyond only because one frontier point sits high is fragile: without that
    rate its verdict is another."""
    rng = np.random.default_rng(3)
    n = 40
    noise = rng.normal(0, 0.3, n)
    spread = rng.normal(0, 1.0, n)
    ncl_points = [(2.0, 0.50), (2.2, 0.45), (2.4, 0.10), (2.6, 0.05)]  # (2.2, 0.45) lifts the frontier at 2.2
    ncl = {f"ncl{x}": _designed_run(x, f, noise, rng, n=n) for x, f in ncl_points}

    def row(x, f, sd=0.05):  # forgetting differs by document with spread sd around f
        run = _designed_run(x, f, noise, rng, n=n)
        run.domain[0][2] += sd * spread
        return run

    # at in-domain 2.5 the frontier is 0.075
    rows = {"primary": row(2.5, 0.04), "weak": row(2.5, 0.064), "null1": row(2.5, 0.075), "null2": row(2.5, 0.08)}
    rows["lifted"] = _designed_run(2.2, 0.40, noise, rng, n=n)  # 0.05 below the lifted point, 0.1 above the line
    study = _study({**ncl, **rows}, n_resamples=400)
    raw = {k: study.gap(k, list(ncl)) for k in rows}
    assert raw["weak"]["verdict"] == "beyond" and 0.05 / 3 < raw["weak"]["p"] < 0.05
    got = frontier_verdicts(study, list(ncl), list(rows), primary=["primary", "lifted"])
    families = {"primary": ["primary", "lifted"], "others": ["weak", "null1", "null2"]}
    for family, members in families.items():
        adjusted = holm({k: raw[k]["p"] for k in members})
        for k in members:
            assert got[k]["family"] == family and got[k]["p_adjusted"] == pytest.approx(adjusted[k], rel=1e-12)
    assert got["weak"]["p_adjusted"] == pytest.approx(3 * raw["weak"]["p"], rel=1e-12)
    assert got["weak"]["verdict"] == "beyond" and got["weak"]["adjusted_verdict"] == "inside"
    assert got["primary"]["adjusted_verdict"] == "beyond" and "fragile_without" not in got["primary"]
    assert {got[k]["adjusted_verdict"] for k in ("null1", "null2")} == {"inside"}
    assert got["lifted"]["verdict"] == "beyond" and got["lifted"]["adjusted_verdict"] == "fragile"
    assert got["lifted"]["fragile_without"]["row"] == "ncl2.2"
    assert got["lifted"]["fragile_without"]["verdict"] == "behind"  # 0.1 above the frontier without the lifted point


def test_blocks_for_halfwidth_formula():
    got = blocks_for_halfwidth([1.0, 2.0, 3.0, 4.0], halfwidth=0.01, tokens_per_block=256)
    var = ((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (3 - 2.5) ** 2 + (4 - 2.5) ** 2) / 3
    assert got["z"] == pytest.approx(Z95, abs=1e-9)
    assert got["blocks"] == math.ceil(Z95**2 * var / 0.01**2) and got["tokens"] == got["blocks"] * 256
    # a mean over two domains: pooled variance (var + 4) / 2 over 2 * n units
    two = blocks_for_halfwidth([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 6.0]], halfwidth=0.05)
    assert two["blocks"] == math.ceil(Z95**2 * (var + 4.0) / 2 / (2 * 0.05**2))
    with pytest.raises(ValueError, match=">= 2 units"):
        blocks_for_halfwidth([[1.0], [2.0, 3.0]])


def test_interval_width_matches_normal_approximation():
    """T = 1 run against an all-zero run: the in-domain difference is the mean of n = 400 documents; its 95%
    interval is ~ 2 * 1.96 * s / sqrt(n) wide, and the budget formula inverts it."""
    rng = np.random.default_rng(3)
    n = 400
    values = rng.normal(3.0, 0.5, n)
    docs = [[f"d{i}" for i in range(n)], ["g0", "g1", "g2", "g3"]]
    run = RunBlocks([[list(values)], [list(values)]], [[0.0] * 4, [0.0] * 4], docs=docs[:1], general_docs=docs[1])
    zero = RunBlocks([[[0.0] * n], [[0.0] * n]], [[0.0] * 4, [0.0] * 4], docs=docs[:1], general_docs=docs[1])
    ci = Study({"a": [run], "b": [zero]}, n_resamples=4000).difference("a", "b")["in_domain_loss"]
    s = values.std(ddof=1)
    normal_width = 2 * Z95 * s / math.sqrt(n)
    assert ci["high"] - ci["low"] == pytest.approx(normal_width, rel=0.08)
    assert blocks_for_halfwidth(values, halfwidth=(ci["high"] - ci["low"]) / 2)["blocks"] == pytest.approx(n, rel=0.2)


def test_run_blocks_refuses_incomplete_and_unpaired_runs():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="T \\+ 1 stages"):
        RunBlocks([[[1.0]], [[1.0]], [[1.0]]], [[1.0]] * 3)
    a, b = _random_run(rng, 2, [3, 3], 3), _random_run(rng, 2, [3, 4], 3)
    with pytest.raises(ValueError, match="same evaluation blocks"):
        Study({"a": [a], "b": [b]}, unit="block")
    docs = [["x", "x", "y"], ["u", "v", "v"], ["g", "h", "h"]]
    c = _random_run(rng, 2, [3, 3], 3, docs)
    other = _random_run(rng, 2, [3, 3], 3, [["x", "y", "y"], ["u", "v", "v"], ["g", "h", "h"]])
    with pytest.raises(ValueError, match="other documents"):
        Study({"c": [c], "o": [other]})
    with pytest.raises(ValueError, match="unit='block'"):
        Study({"a": [a]})  # no document ids: the old evaluation must be read as such, explicitly
    with pytest.raises(ValueError, match="docs must name one document per evaluation block"):
        RunBlocks([[[1.0, 2.0]], [[1.0, 2.0]]], [[1.0], [1.0]], docs=[["a"]], general_docs=["g"])


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


def _results_dirs(root, rows=None, seeds=(0,), by_document=True) -> list:
    """Run directories holding results.json with per-block losses (20 blocks from 10 documents per group): by
    default three ncl learning rates and one das run whose in-domain loss (1.5) is left of the ncl range."""
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 0.3, 20)
    docs = [[f"{g}/doc{b // 2}" for b in range(20)] for g in ("business", "sports", "general")]
    rows = rows or [("ncl", 2.0, 0.5), ("ncl", 2.2, 0.3), ("ncl", 2.4, 0.1), ("das", 1.5, 0.0)]
    dirs = []
    for name, x, f in rows:
        for seed in seeds:
            run = _designed_run(x, f + 0.01 * seed, noise, rng)
            point = run_metrics(run)
            results = {
                "strategy": name,
                "run_name": name,
                "learning_rate": x,
                "seed": seed,
                "complete": True,
                "bwt": -point["forgetting"],
                "final_mean_loss": x,
                **point,
                "eval_block_losses": [[list(run.domain[j][s]) for j in range(2)] for s in range(3)],
                "general_block_losses": run.general.tolist(),
                "eval_block_tokens": [[63] * 20, [63] * 20],
                "general_block_tokens": [63] * 20,
            }
            if by_document:
                results.update(eval_block_docs=docs[:2], general_block_docs=docs[2])
            d = root / f"{name}_{x}_s{seed}"
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


def test_frontier_json_and_table_carry_the_design(tmp_path):
    """frontier.json opens with the design (unit, documents, seeds, resamples, primary, adjustment, control, the
    command and the evaluation documents' ids); frontier.md prints the raw interval, the adjusted verdict, the design
    and the command; a control row is marked and judged."""
    rows = [("ncl", 2.0, 0.5), ("ncl", 2.2, 0.3), ("ncl", 2.4, 0.1), ("das", 2.1, 0.1), ("ncl_control", 2.3, 0.2)]
    dirs = _results_dirs(tmp_path / "runs", rows, seeds=(0, 1, 2))
    cmd = "python scripts/continual_pretrain.py --config study.yaml"
    payload = write_frontier(tmp_path, dirs, n_resamples=200, primary="das", control="ncl_control", command=cmd)
    saved = _strict_json((tmp_path / "frontier.json").read_text())
    assert list(saved)[0] == "design" and saved["design"] == payload["design"]
    design = saved["design"]
    assert design["resampling_unit"] == "document" and design["seeds"] == [0, 1, 2]
    assert design["held_out_documents"] == {"domain 0": 10, "domain 1": 10, "general": 10}
    assert design["resamples"] == 200 and design["confidence"] == 0.95
    assert design["primary_comparison"] == "das" and design["primary_rows"] == ["das@lr2.1"]
    assert design["adjustment"].startswith("holm") and design["control_row"] == "ncl_control"
    assert design["command"] == cmd and "in the intervals" in design["training_noise"]
    assert design["evaluation_documents"]["general"][:2] == ["general/doc0", "general/doc0"]
    das = next(r for r in saved["runs"] if r["strategy"] == "das")
    assert das["primary"] and das["forgetting_gap"]["adjusted_verdict"] == "beyond"
    control = next(r for r in saved["runs"] if r["strategy"] == "ncl_control")
    assert control["control"] and control["forgetting_gap"]["adjusted_verdict"] == "inside"
    md = (tmp_path / "frontier.md").read_text()
    assert cmd in md and "das (primary)" in md and "ncl_control (control)" in md
    assert "not beyond, as it must be" in md and "resampling unit **document**" in md
    assert design["control_check"] == "not beyond"


def test_a_control_outside_the_frontiers_range_is_reported_as_untested(tmp_path):
    """The CPU study's control reached an in-domain loss below every frontier rate's: its gap is undefined, so it
    tested nothing. Before the fix the table said "not beyond, as it must be" (a pass) all the same."""
    rows = [("ncl", 2.0, 0.5), ("ncl", 2.2, 0.3), ("ncl", 2.4, 0.1), ("das", 2.1, 0.1), ("ncl_control", 1.5, 0.6)]
    dirs = _results_dirs(tmp_path / "runs", rows, seeds=(0, 1, 2))
    payload = write_frontier(tmp_path, dirs, n_resamples=200, primary="das", control="ncl_control")
    control = next(r for r in payload["runs"] if r["strategy"] == "ncl_control")
    assert control["forgetting_gap"]["estimate"] is None
    assert payload["design"]["control_check"] == "untested"
    md = (tmp_path / "frontier.md").read_text()
    assert "as it must be" not in md and "it checked nothing; the frontier is untested" in md
    # a control inside the range is a check; one reading beyond says the frontier flatters
    for forgetting, check in ((0.2, "not beyond"), (0.0, "beyond")):
        rows[-1] = ("ncl_control", 2.3, forgetting)
        out = tmp_path / f"f{forgetting}"
        dirs = _results_dirs(out / "runs", rows, seeds=(0, 1, 2))
        assert write_frontier(out, dirs, n_resamples=200, control="ncl_control")["design"]["control_check"] == check


def test_runs_without_document_ids_are_read_as_blocks_and_flagged(tmp_path):
    dirs = _results_dirs(tmp_path / "runs", by_document=False)
    payload = write_frontier(tmp_path, dirs, n_resamples=100)
    assert payload["design"]["resampling_unit"] == "block"
    assert "NOT in the intervals" in payload["design"]["training_noise"]
    assert "Do not read verdicts from this table" in (tmp_path / "frontier.md").read_text()


def test_frontier_of_finished_runs_from_absolute_globs(tmp_path):
    """``--frontier_runs`` takes directories and globs, absolute or relative; a pattern that matches no finished
    run is an error naming it (it used to be skipped, or to crash on an absolute glob)."""
    from hf_softmask.continual import parse_config, run_continual_pretraining

    _results_dirs(tmp_path / "sweep")
    out = tmp_path / "table"
    runs = f"{tmp_path}/sweep/ncl_*,{tmp_path}/sweep/das_1.5_s0"
    args = parse_config(["--frontier_runs", runs, "--output_dir", str(out)])
    payload = run_continual_pretraining(args)
    assert sorted(r["strategy"] for r in payload["runs"]) == ["das", "ncl", "ncl", "ncl"]
    assert (out / "frontier.md").is_file() and payload["design"]["command"].startswith("python ")
    missing = f"{tmp_path}/sweep/lora_*"
    args = parse_config(["--frontier_runs", f"{tmp_path}/sweep/ncl_*,{missing}", "--output_dir", str(out)])
    with pytest.raises(FileNotFoundError, match="lora_"):
        run_continual_pretraining(args)
