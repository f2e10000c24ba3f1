"""PNG plots of continual-learning results: score matrices, unit importance and learning-rate frontiers.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing this module changes no global
backend state and works on headless machines. Every function writes its PNG atomically and returns the path.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["plot_frontier", "plot_importance", "plot_matrix"]


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory so os.replace is a same-filesystem rename: readers never see half a PNG.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _to_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return np.asarray([[math.nan if v is None else float(v) for v in row] for row in x], dtype=np.float64)


def plot_matrix(
    A,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    fmt: str = ".2f",
    cmap: str = "viridis",
) -> Path:
    """Annotated heatmap of a score matrix (e.g. accuracy or perplexity per task after each stage); None/NaN cells blank."""
    M = _to_array(A)
    if M.ndim != 2 or M.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix shape {M.shape} does not match {len(row_labels)} row and {len(col_labels)} column labels")
    masked = np.ma.masked_invalid(M)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="white")

    fig = _new_figure((1.2 + 0.9 * M.shape[1], 1.0 + 0.7 * M.shape[0]))
    ax = fig.add_subplot()
    finite = M[np.isfinite(M)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(masked, cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax)
    span = (vmax - vmin) or 1.0
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            v = M[i, j]
            if not math.isfinite(v):
                continue
            r, g, b, _ = colormap((v - vmin) / span)
            # Pick the annotation colour by the cell's luminance so the number stays readable on any colormap.
            color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
            ax.text(j, i, format(v, fmt), ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(M.shape[1]), [str(c) for c in col_labels], rotation=30, ha="right")
    ax.set_yticks(range(M.shape[0]), [str(r) for r in row_labels])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training on")
    ax.set_title(title)
    return _save(fig, path)


def plot_importance(heads, ffn, path: str | os.PathLike, title: str = "") -> Path:
    """Two heatmaps of unit importance, attention heads ``[L, H]`` and FFN neurons ``[L, I]``, layers on the y axis."""
    H = _to_array(heads)
    F = _to_array(ffn)
    if H.ndim != 2 or F.ndim != 2 or H.shape[0] != F.shape[0]:
        raise ValueError(f"expected heads [L, H] and ffn [L, I] with the same L, got {H.shape} and {F.shape}")
    L = H.shape[0]
    fig = _new_figure((12, 1.5 + 0.35 * L))
    ax_h, ax_f = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3]})
    for ax, data, name, xlabel in ((ax_h, H, "attention heads", "head"), (ax_f, F, "FFN neurons", "neuron")):
        # nearest interpolation: thousands of neurons are downsampled, not blurred into neighbours.
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma")
        fig.colorbar(im, ax=ax)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.set_yticks(range(L), [str(i) for i in range(L)])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return _save(fig, path)


def plot_frontier(
    records: Sequence[dict],
    path: str | os.PathLike,
    x: str = "in_domain_loss",
    y: str = "forgetting",
    group: str = "strategy",
    label: str = "lr",
    title: str = "",
) -> Path:
    """One line of points per ``group`` value in the (``x``, ``y``) plane, each point annotated with its ``label``.

    Points within a group are connected in order of ``label`` when it is numeric (a learning-rate sweep), else of
    ``x``. Records whose ``x`` or ``y`` is missing or NaN are skipped.
    """

    def usable(r):
        try:
            return math.isfinite(float(r[x])) and math.isfinite(float(r[y]))
        except (KeyError, TypeError, ValueError):
            return False

    rows = [r for r in records if usable(r)]
    if not rows:
        raise ValueError(f"no record has finite {x!r} and {y!r} values to plot")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(group, "")), []).append(r)

    fig = _new_figure((7, 5))
    ax = fig.add_subplot()
    for name, members in groups.items():
        numeric = all(isinstance(m.get(label), (int, float)) for m in members)
        members = sorted(members, key=(lambda m: m[label]) if numeric else (lambda m: float(m[x])))
        xs = [float(m[x]) for m in members]
        ys = [float(m[y]) for m in members]
        ax.plot(xs, ys, marker="o", label=name)
        for m, xv, yv in zip(members, xs, ys):
            if m.get(label) is None:
                continue
            text = format(m[label], "g") if isinstance(m[label], (int, float)) else str(m[label])
            ax.annotate(text, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title=group)
    return _save(fig, path)
