"""Plots are real PNG files, written atomically."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from PIL import Image

from hf_softmask.evaluation import plotting as P


def _check_png(path, expected):
    assert path == expected and expected.stat().st_size > 0
    with Image.open(expected) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
        size = im.size
    # No temp files are left next to the result.
    assert sorted(p.name for p in expected.parent.iterdir()) == [expected.name]
    return size


def test_plot_matrix(tmp_path):
    A = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.75, 0.85]]
    out = tmp_path / "acc" / "matrix.png"
    _check_png(P.plot_matrix(A, ["t0", "t1", "t2"], ["t0", "t1", "t2"], out, "accuracy"), out)
    # Overwriting an existing plot (tensor input, NaN cells, other colormap) replaces it in place.
    ppl = torch.tensor([[12.5, math.nan], [14.0, 9.25]])
    _check_png(P.plot_matrix(ppl, ["a", "b"], ["a", "b"], out, "perplexity", fmt=".1f", cmap="magma_r"), out)
    with pytest.raises(ValueError, match="does not match"):
        P.plot_matrix(A, ["t0"], ["t0", "t1", "t2"], tmp_path / "bad.png", "x")


def test_plot_importance(tmp_path):
    g = torch.Generator().manual_seed(0)
    out = tmp_path / "importance.png"
    w, h = _check_png(
        P.plot_importance(torch.rand(6, 12, generator=g), torch.rand(6, 1536, generator=g), out, "MiniLM"), out
    )
    assert w > h  # two side-by-side panels
    with pytest.raises(ValueError, match="same L"):
        P.plot_importance(torch.rand(6, 12), torch.rand(4, 64), tmp_path / "bad.png", "x")


def test_plot_frontier(tmp_path):
    records = (
        [
            {"strategy": "finetune", "lr": lr, "in_domain_loss": loss, "forgetting": f}
            for lr, loss, f in [(1e-5, 3.1, 0.05), (5e-5, 2.7, 0.2), (1e-4, 2.5, 0.45)]
        ]
        + [
            {"strategy": "softmask", "lr": lr, "in_domain_loss": loss, "forgetting": f}
            for lr, loss, f in [(1e-5, 3.2, 0.01), (5e-5, 2.8, 0.06), (1e-4, 2.6, 0.12)]
        ]
        + [{"strategy": "softmask", "lr": 1e-3, "in_domain_loss": 2.4, "forgetting": None}]
    )  # diverged run: skipped
    out = tmp_path / "frontier.png"
    _check_png(P.plot_frontier(records, out), out)
    with pytest.raises(ValueError, match="no record has finite"):
        P.plot_frontier([{"strategy": "x"}], tmp_path / "bad.png")


def test_importance_plot_is_readable_and_says_which_importance(tmp_path):
    """FFN importance as one sorted curve per layer (not a 1,536-column strip); panel titles say own vs accumulated."""
    g = torch.Generator().manual_seed(0)
    own = (torch.rand(6, 12, generator=g), torch.rand(6, 1536, generator=g))
    acc = (
        torch.maximum(own[0], torch.rand(6, 12, generator=g)),
        torch.maximum(own[1], torch.rand(6, 1536, generator=g)),
    )
    fig = P.importance_figure({"own": own, "accumulated (= importance.safetensors)": acc}, "after 2_sports")
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("own: FFN") for t in titles) and any(t.startswith("accumulated") for t in titles)
    ffn_axes = [ax for ax in fig.axes if "FFN" in ax.get_title()]
    assert len(ffn_axes) == 2
    for ax, (_, ffn) in zip(ffn_axes, (own, acc)):
        lines = ax.get_lines()
        assert len(lines) == 6  # one curve per layer
        for layer, line in enumerate(lines):
            y = line.get_ydata()
            assert (y[:-1] >= y[1:]).all()  # sorted, most important first
            assert sorted(y.tolist()) == sorted(ffn[layer].tolist())  # exactly that layer's values
    out = tmp_path / "imp.png"
    _check_png(P.plot_importance(*own, out, "x", label="own", extra={"accumulated": acc}), out)


def test_accuracy_matrix_names_tasks_and_classes(tmp_path):
    out = tmp_path / "acc.png"
    _check_png(
        P.plot_accuracy_matrix(
            [[0.9, 0.5], [0.8, 0.95]],
            ["business_vs_sport", "tech_vs_politics"],
            [["business", "sport"], ["tech", "politics"]],
            out,
            "ft",
        ),
        out,
    )
    with Image.open(out) as im:
        assert im.size[0] > 300  # wide enough for the names
