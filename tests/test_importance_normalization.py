"""Normalized importance: each named map by hand on small cases, monotonicity, range, flat rows, the default."""

import math

import pytest
import torch

from hf_softmask import NORMALIZATIONS, UnitImportance, compute_importance
from hf_softmask.core.importance import DEFAULT_NORMALIZATION, normalize_importance
from tests.testing_utils import random_lm_batches, tiny_llama

MONOTONIC = [n for n in NORMALIZATIONS if n != "abs_tanh"]


def _z(row, ddof=0):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - ddof))
    return [(v - mean) / std for v in row]


def test_the_published_map_and_the_candidates_are_named():
    assert {"abs_tanh", "tanh", "pooled_tanh", "rank", "pooled_rank"} <= set(NORMALIZATIONS)
    assert DEFAULT_NORMALIZATION == "pooled_tanh"


def test_abs_tanh_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    want = [abs(math.tanh(z)) for z in _z([1, 2, 3, 4], ddof=1)]  # 0.8212, 0.3689, 0.3689, 0.8212 (torch.std)
    torch.testing.assert_close(normalize_importance(x, "abs_tanh")[0], torch.tensor(want))


def test_one_sided_tanh_by_hand_is_per_layer():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]])
    z0, z1 = _z([1, 2, 3, 4]), _z([10, 0, 0, 0])
    want = [[max(0.0, math.tanh(z)) for z in z0], [max(0.0, math.tanh(z)) for z in z1]]
    got = normalize_importance(x, "tanh")
    torch.testing.assert_close(got, torch.tensor(want))
    assert got[0, :2].tolist() == [0.0, 0.0]  # below the layer mean: no protection (abs_tanh gives 0.87 to unit 0)
    assert got[1, 0] == pytest.approx(math.tanh(math.sqrt(3)))  # z of the one used unit is sqrt(3)


def test_pooled_tanh_by_hand_uses_all_layers():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    want = [max(0.0, math.tanh(z)) for z in _z([1, 2, 3, 4])]
    torch.testing.assert_close(normalize_importance(x, "pooled_tanh").flatten(), torch.tensor(want))
    # per layer, each row's larger unit would get tanh(1) and layer 0 would not be below layer 1
    t1 = pytest.approx(math.tanh(1))
    assert normalize_importance(x, "tanh").tolist() == [[0.0, t1], [0.0, t1]]


def test_rank_by_hand_mid_ranks_for_ties():
    x = torch.tensor([[10.0, 30.0, 20.0, 20.0], [4.0, 3.0, 2.0, 1.0]])
    # ranks 0, 3, (1 + 2) / 2, (1 + 2) / 2 over n - 1 = 3
    want = torch.tensor([[0.0, 1.0, 0.5, 0.5], [1.0, 2 / 3, 1 / 3, 0.0]])
    torch.testing.assert_close(normalize_importance(x, "rank"), want)


def test_pooled_rank_by_hand():
    x = torch.tensor([[1.0, 4.0], [2.0, 3.0]])
    torch.testing.assert_close(normalize_importance(x, "pooled_rank"), torch.tensor([[0.0, 1.0], [1 / 3, 2 / 3]]))
    torch.testing.assert_close(normalize_importance(x, "rank"), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


@pytest.mark.parametrize("normalization", MONOTONIC)
def test_monotonic_in_the_raw_estimate_and_in_unit_interval(normalization):
    """A less used unit never gets more protection: x_i < x_j implies I_i <= I_j (within a layer, or over all
    layers for the pooled maps), on skewed, heavy-tailed and tied raw values."""
    pooled = normalization.startswith("pooled")
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        x = torch.rand(4, 12, generator=g).pow(1 + trial % 5) * torch.rand(4, 1, generator=g) * 10
        x[0, :3] = x[0, 3]  # ties
        x[1, 0] = 100.0  # an outlier
        y = normalize_importance(x, normalization)
        assert y.min() >= 0 and y.max() <= 1
        xs, ys = (x.reshape(1, -1), y.reshape(1, -1)) if pooled else (x, y)
        less = xs.unsqueeze(-1) < xs.unsqueeze(-2)  # [row, i, j]: x_i < x_j
        assert (ys.unsqueeze(-1) <= ys.unsqueeze(-2) + 1e-7)[less].all()


def test_abs_tanh_is_not_monotonic():
    """The reason for the new default: a unit far below its layer's mean is protected more than one at the mean."""
    y = normalize_importance(torch.tensor([[0.0, 5.0, 5.0, 5.0, 5.0, 5.0]]), "abs_tanh")
    assert y[0, 0] > 0.9 > y[0, 1]


@pytest.mark.parametrize("normalization", list(NORMALIZATIONS))
def test_flat_rows_give_zero_with_a_warning(normalization):
    x = torch.full((2, 4), 3.0)
    with pytest.warns(RuntimeWarning, match="constant"):
        y = normalize_importance(x, normalization)
    assert y.tolist() == [[0.0] * 4] * 2


def test_unknown_normalization_names_the_choices():
    with pytest.raises(ValueError, match="abs_tanh"):
        UnitImportance(torch.ones(1, 2), torch.ones(1, 2)).normalized("softmax")
    with pytest.raises(ValueError, match="pooled_rank"):
        compute_importance(tiny_llama(), random_lm_batches(1), "lm_loss", normalization="nope", show_progress=False)


@pytest.mark.parametrize("normalization", list(NORMALIZATIONS))
def test_compute_importance_returns_the_named_map_of_its_raw_estimate(normalization):
    """What masks are built from: the normalized values, checked against the raw ones of the same data."""
    model, batches = tiny_llama(), random_lm_batches(2)  # no dropout: lm_loss importance is deterministic
    raw = compute_importance(model, batches, "lm_loss", normalize=False, show_progress=False)
    got = compute_importance(model, batches, "lm_loss", normalization=normalization, show_progress=False)
    torch.testing.assert_close(got.heads, normalize_importance(raw.heads, normalization))
    torch.testing.assert_close(got.ffn, normalize_importance(raw.ffn, normalization))
    assert got.meta["normalization"] == normalization and got.meta["normalized"] is True
    default = compute_importance(model, batches, "lm_loss", show_progress=False)
    assert default.meta["normalization"] == DEFAULT_NORMALIZATION
