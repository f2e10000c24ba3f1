"""Normalized importance is stable on real text: two disjoint halves of the shipped BBC corpus give split-half
correlation >= 0.9 on heads and on FFN neurons for the shipped MiniLM (kl_dropout, lm_loss, 16k tokens per half)
and the shipped SmolLM2-135M (lm_loss, 64k tokens per half).

The published |tanh z| stays below the default on heads at the same sample size (the reason for the new default)."""

import sys
import warnings
from pathlib import Path

import pytest

from hf_softmask import compute_importance
from hf_softmask.core.importance import DEFAULT_NORMALIZATION

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_importance import bbc_halves  # noqa: E402  (the halves of the documented sample-size curve)


def _split_half(model, tok, mlm, objective, blocks):
    halves = bbc_halves(tok, mlm, blocks)
    a, b = (compute_importance(model, half, objective, normalize=False, show_progress=False) for half in halves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {n: a.normalized(n).split_half(b.normalized(n)) for n in (DEFAULT_NORMALIZATION, "abs_tanh")}, a


@pytest.mark.slow
@pytest.mark.expensive  # minutes on a 2-core CPU: run with pytest -m expensive
@pytest.mark.parametrize("objective,blocks", [("kl_dropout", 128), ("lm_loss", 128)])
def test_minilm_normalized_importance_is_stable(minilm_dir, objective, blocks):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForMaskedLM.from_pretrained(minilm_dir)
    r, raw = _split_half(model, tok, True, objective, blocks)
    assert r[DEFAULT_NORMALIZATION]["heads"] >= 0.9 and r[DEFAULT_NORMALIZATION]["ffn"] >= 0.9, r
    assert r["abs_tanh"]["heads"] < r[DEFAULT_NORMALIZATION]["heads"], r
    assert raw.meta["tokens"] > 0


@pytest.mark.slow
@pytest.mark.expensive  # ~16 CPU-minutes: run with pytest -m expensive
def test_smollm2_normalized_importance_is_stable(smollm2_dir):
    """SmolLM2-135M, lm_loss, 64k input tokens per half (512 blocks of 128): split-half >= 0.9 on heads and on FFN
    neurons with the default normalization, which beats the paper's map on both. Its 46k FFN neurons need this
    much: 0.76 at 16k and 0.86 at 32k tokens per half (docs/importance.md, the sample-size curve)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    r, _ = _split_half(model, tok, False, "lm_loss", 512)
    assert r[DEFAULT_NORMALIZATION]["heads"] >= 0.9 and r[DEFAULT_NORMALIZATION]["ffn"] >= 0.9, r
    default, paper = r[DEFAULT_NORMALIZATION], r["abs_tanh"]
    assert default["heads"] > paper["heads"] and default["ffn"] > paper["ffn"], r
