"""PNG plots of continual-learning results: score matrices, unit importance and learning-rate frontiers.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing this module changes no global
backend state and works on headless machines. Every function writes its PNG atomically and returns the path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils.extras import missing_extra
from ..utils.io import atomic_write

try:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ModuleNotFoundError as e:  # matplotlib is the optional 'plots' extra
    if e.name != "matplotlib":
        raise
    raise missing_extra("matplotlib", "hf_softmask.evaluation.plotting (PNG plots)") from None

__all__ = ["plot_accuracy_matrix", "plot_frontier", "plot_importance", "plot_matrix", "importance_figure"]


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


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
    """Annotated heatmap of a score matrix (e.g. accuracy or perplexity per task after each stage); None/NaN blank."""
    M = _to_array(A)
    if M.ndim != 2 or M.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"matrix shape {M.shape} does not match {len(row_labels)} row and {len(col_labels)} column labels"
        )
    masked = np.ma.masked_invalid(M)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="white")

    # Size from the labels: task and class names must fit beside and below the cells.
    col_lines = [line for c in col_labels for line in str(c).split("\n")]
    col_w = max(0.9, 0.085 * max((len(line) for line in col_lines), default=1))
    row_w = 0.08 * max((len(str(r)) for r in row_labels), default=1)
    n_lines = max((len(str(c).split("\n")) for c in col_labels), default=1)
    fig = _new_figure((1.6 + row_w + col_w * M.shape[1], 1.4 + 0.7 * M.shape[0] + 0.25 * n_lines))
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
    multiline = n_lines > 1
    ax.set_xticks(
        range(M.shape[1]),
        [str(c) for c in col_labels],
        rotation=0 if multiline else 30,
        ha="center" if multiline else "right",
    )
    ax.set_yticks(range(M.shape[0]), [str(r) for r in row_labels])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training on")
    ax.set_title(title)
    return _save(fig, path)


def importance_figure(panels: dict, title: str = "") -> Figure:
    """The importance figure: one row per panel (``{label: (heads [L, H], ffn [L, I])}``), attention heads as a
    heatmap (few enough to read cell by cell) and FFN neurons as one sorted curve per layer (thousands of columns
    cannot be read as a heatmap; a sorted curve shows how many neurons each layer protects and how strongly)."""
    rows = []
    for label, (heads, ffn) in panels.items():
        H, F = _to_array(heads), _to_array(ffn)
        if H.ndim != 2 or F.ndim != 2 or H.shape[0] != F.shape[0]:
            raise ValueError(f"expected heads [L, H] and ffn [L, I] with the same L, got {H.shape} and {F.shape}")
        rows.append((label, H, F))
    L = rows[0][1].shape[0]
    fig = _new_figure((12, 0.6 + max(2.6, 0.35 * L) * len(rows)))
    axes = fig.subplots(len(rows), 2, gridspec_kw={"width_ratios": [1, 2]}, squeeze=False)
    colors = matplotlib.colormaps["viridis"]
    for (label, H, F), (ax_h, ax_f) in zip(rows, axes):
        im = ax_h.imshow(H, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=1.0)
        fig.colorbar(im, ax=ax_h)
        ax_h.set_title(f"{label}: attention heads")
        ax_h.set_xlabel("head")
        ax_h.set_ylabel("layer")
        ax_h.set_yticks(range(L), [str(i) for i in range(L)])
        ax_h.xaxis.set_major_locator(MaxNLocator(integer=True))
        n = F.shape[1]
        x = np.arange(1, n + 1) / n
        for layer in range(F.shape[0]):
            ax_f.plot(x, np.sort(F[layer])[::-1], color=colors(layer / max(F.shape[0] - 1, 1)), label=f"layer {layer}")
        ax_f.set_title(f"{label}: FFN neurons, sorted per layer ({n} per layer)")
        ax_f.set_xlabel("fraction of the layer's neurons (most important first)")
        ax_f.set_ylabel("importance")
        ax_f.set_ylim(-0.02, 1.02)
        ax_f.grid(True, alpha=0.3)
        ax_f.legend(fontsize=7, ncol=2 if F.shape[0] > 6 else 1)
    fig.suptitle(title)
    return fig


def plot_importance(
    heads, ffn, path: str | os.PathLike, title: str = "", label: str = "importance", extra: dict | None = None
) -> Path:
    """Importance of attention heads ``[L, H]`` (heatmap) and FFN neurons ``[L, I]`` (sorted curve per layer);
    ``extra`` adds rows ``{label: (heads, ffn)}`` below (e.g. the accumulated importance beside a domain's own)."""
    return _save(importance_figure({label: (heads, ffn), **(extra or {})}, title), path)


def plot_accuracy_matrix(
    A,
    task_names: Sequence[str],
    label_names: Sequence[Sequence[str]],
    path: str | os.PathLike,
    title: str = "",
    fmt: str = ".2f",
) -> Path:
    """Accuracy after each task (rows) on every task (columns), labelled with the task and its class names."""
    cols = [f"{name}\n({', '.join(map(str, classes))})" for name, classes in zip(task_names, label_names)]
    rows = [f"after {name}" for name in task_names[: len(A)]]
    return plot_matrix(A, rows, cols, path, title=title, fmt=fmt)


def plot_frontier(
    records: Sequence[dict],
    path: str | os.PathLike,
    x: str = "in_domain_loss",
    y: str = "forgetting",
    group: str = "strategy",
    label: str = "lr",
    title: str = "",
    frontier: Sequence[tuple[float, float]] | None = None,
) -> Path:
    """One line of points per ``group`` value in the (``x``, ``y``) plane, each point annotated with its ``label``.

    Points within a group are connected in order of ``label`` when it is numeric (a learning-rate sweep), else of
    ``x``. Records whose ``x`` or ``y`` is missing or NaN are skipped. ``frontier``: points of the curve runs are
    judged against, drawn dashed behind them.
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
    if frontier:
        fx, fy = zip(*frontier)
        ax.plot(fx, fy, linestyle="--", color="0.5", linewidth=3, alpha=0.5, label="frontier (non-dominated)")
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
