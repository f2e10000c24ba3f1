"""Calibration of the frontier's verdicts by simulation: null rows (plain training at a rate off the frontier's
grid, true gap 0 on a linear frontier) with document-level, block-level and seed-level noise must read beyond or
behind at the nominal rate; the old analysis (blocks resampled as independent, seeds averaged away) must not.

The simulated study (T = 2 domains and general text, module ``_study``): every row's training changes each held-out
block's loss by its mean effect (in-domain gains ``0.2 * lr``, forgetting ``0.05 * lr``: points on a straight line)
plus a seed effect (``sd_seed``, one draw per row, seed and change), a document effect and a block effect whose
shares of ``sd_unit`` are set by the intra-class correlation ``icc``; both are half shared by every row (documents
that every method forgets) and half the row's own. Document difficulty is shared by all rows and stages.
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_softmask.evaluation.bootstrap import RunBlocks, Study

LRS = (1.0, 1.41, 2.0, 2.83, 4.0)  # a dense grid: no step wider than sqrt(2)
NULL_LR = 1.7  # off the grid: plain training judged like a method


def _study(rng, icc, seeds=3, docs=32, per_doc=2, sd_seed=0.01, sd_unit=0.03, shared=0.5):
    n = docs * per_doc
    doc_of = np.repeat(np.arange(docs), per_doc)
    names = [[f"{g}/{d}" for d in doc_of] for g in ("a", "b", "general")]
    difficulty = [rng.normal(0, 0.5, docs)[doc_of] + rng.normal(0, 0.2, n) for _ in range(3)]
    common_doc, common_blk = rng.normal(size=(3, docs)), rng.normal(size=(3, n))
    sd_doc, sd_blk = np.sqrt(icc) * sd_unit, np.sqrt(1 - icc) * sd_unit
    rows = {}
    for label, lr in [(f"ncl@{x}", x) for x in LRS] + [("null", NULL_LR)]:
        doc = np.sqrt(shared) * common_doc + np.sqrt(1 - shared) * rng.normal(size=(3, docs))
        blk = np.sqrt(shared) * common_blk + np.sqrt(1 - shared) * rng.normal(size=(3, n))
        response = sd_doc * doc[:, doc_of] + sd_blk * blk  # [change, block]: gain a, gain b, forgetting of a
        runs = []
        for seed in range(seeds):
            z = sd_seed * rng.normal(size=3)
            gain_a, gain_b = 0.2 * lr + z[0] + response[0], 0.2 * lr + z[1] + response[1]
            forget_a = 0.05 * lr + z[2] + response[2]
            a, b, g = 3 + difficulty[0], 3 + difficulty[1], 3 + difficulty[2]
            loss = [[a, b], [a - gain_a, b], [a - gain_a + forget_a, b - gain_b]]
            general = [g, g + 0.01 * lr, g + 0.02 * lr + response[2]]
            runs.append(RunBlocks(loss, general, docs=names[:2], general_docs=names[2], seed=seed))
        rows[label] = runs
    return rows


def _false_rates(icc, n_studies, old=False, **kw):
    """Fractions of simulated studies whose null row reads beyond / behind the frontier (raw 95% interval)."""
    rng = np.random.default_rng(1000 + int(100 * icc) + 7 * old)
    counts = {"beyond": 0, "behind": 0}
    for i in range(n_studies):
        rows = _study(rng, icc, **kw)
        if old:  # the old analysis: one averaged run per row, every block its own unit
            rows = {k: [RunBlocks.mean(v)] for k, v in rows.items()}
        study = Study(rows, n_resamples=150, seed=i, unit="block" if old else "document")
        verdict = study.gap("null", [f"ncl@{x}" for x in LRS])["verdict"]
        if verdict in counts:
            counts[verdict] += 1
    return {k: v / n_studies for k, v in counts.items()}


N = 250
# 3 Monte-Carlo standard errors of a 2.5% (one side) and 5% (both sides) rate over N studies
SIDE_MAX = 0.025 + 3 * (0.025 * 0.975 / N) ** 0.5
BOTH = (0.05 - 3 * (0.05 * 0.95 / N) ** 0.5, 0.05 + 3 * (0.05 * 0.95 / N) ** 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("icc", [0.0, 0.4, 0.8])
def test_document_and_seed_intervals_are_calibrated(icc):
    """Three seeds, 32 documents x 2 blocks per group: false beyond and false behind each <= 2.5% + 3 MC errors, and
    both together within 3 MC errors of 5%, at every intra-class correlation."""
    rates = _false_rates(icc, N)
    assert rates["beyond"] <= SIDE_MAX and rates["behind"] <= SIDE_MAX, rates
    assert BOTH[0] <= rates["beyond"] + rates["behind"] <= BOTH[1], rates


@pytest.mark.slow
def test_old_block_bootstrap_is_miscalibrated():
    """The old evaluation and analysis: 16 blocks from 2 documents per group... here 8 documents x 8 blocks, blocks
    resampled as independent and the seeds averaged away: the null row reads beyond or behind far more often than
    5% -- and the same data read by documents and seeds is back at nominal."""
    kw = dict(docs=8, per_doc=8)
    old = _false_rates(0.4, 150, old=True, **kw)
    assert old["beyond"] + old["behind"] > 0.25, old
    new = _false_rates(0.4, 150, **kw)
    assert new["beyond"] + new["behind"] < 0.1, new


def test_block_bootstrap_says_beyond_where_documents_say_inside():
    """A constructed case: the row forgets less than the frontier on 5 of 8 documents and more on 3, each document's
    blocks alike. Resampling its 64 blocks as independent gives an interval below 0 (beyond); resampling the 8
    documents gives one that holds 0 (inside)."""
    rng = np.random.default_rng(0)
    docs, per_doc = 8, 8
    n = docs * per_doc
    doc_of = np.repeat(np.arange(docs), per_doc)
    names = [[f"{g}/{d}" for d in doc_of] for g in ("a", "b", "general")]
    base = 3 + rng.normal(0, 0.5, n)
    effect = np.array([-0.3, -0.3, -0.25, -0.2, -0.1, 0.1, 0.15, 0.1])[doc_of] + rng.normal(0, 0.01, n)

    def run(x, f, extra=0.0):
        a, b = base.copy(), base.copy()
        loss = [[a, b], [a - x, b], [a - x + f + extra, b - x]]
        return RunBlocks(loss, [base, base, base], docs=names[:2], general_docs=names[2])

    rows = {"ncl1": [run(0.2, 0.1)], "ncl2": [run(0.4, 0.3)], "row": [run(0.3, 0.2, effect)]}
    block = Study(rows, n_resamples=1000, unit="block").gap("row", ["ncl1", "ncl2"])
    document = Study(rows, n_resamples=1000).gap("row", ["ncl1", "ncl2"])
    assert block["estimate"] == pytest.approx(document["estimate"]) and block["estimate"] < 0
    assert block["verdict"] == "beyond" and document["verdict"] == "inside", (block, document)
