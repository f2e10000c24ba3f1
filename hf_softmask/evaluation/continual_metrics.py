"""Continual-learning summaries of a T x T score matrix.

``A[i][j]`` is the score on task ``j`` after training through task ``i``. Entries above the diagonal
(tasks not trained yet) may be None or NaN; only ``forward_transfer`` reads them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "summarize"]


def _as_matrix(A) -> np.ndarray:
    if hasattr(A, "detach"):
        A = A.detach().cpu().tolist()
    rows = [[math.nan if v is None else float(v) for v in row] for row in A]
    T = len(rows)
    if T == 0 or any(len(r) != T for r in rows):
        raise ValueError(f"expected a square T x T score matrix with T >= 1, got row lengths {[len(r) for r in rows]}")
    M = np.asarray(rows, dtype=np.float64)
    # Everything on and below the diagonal was measured after the task was trained; a gap there is a bug upstream.
    missing = [(i, j) for i in range(T) for j in range(i + 1) if math.isnan(M[i, j])]
    if missing:
        raise ValueError(f"score matrix has missing entries on or below the diagonal at (row, col) {missing}")
    return M


def average_accuracy(A) -> float:
    """Mean score over all tasks after training on the last one: mean_j A[T-1][j]."""
    M = _as_matrix(A)
    return float(M[-1].mean())


def backward_transfer(A, higher_is_better: bool = True) -> float:
    """Mean change on earlier tasks from when each was learned to the end (positive = improved).

    ``mean_{j<T-1}(A[T-1][j] - A[j][j])``; with ``higher_is_better=False`` (loss, perplexity) the sign is flipped
    so that positive still means better. 0.0 when T == 1.
    """
    M = _as_matrix(A)
    T = len(M)
    if T == 1:
        return 0.0
    diff = np.array([M[T - 1, j] - M[j, j] for j in range(T - 1)])
    return float(diff.mean() if higher_is_better else -diff.mean())


def forgetting(A, higher_is_better: bool = True) -> float:
    """Mean drop on earlier tasks from their best score before the last task to the final score (positive = forgot).

    ``mean_{j<T-1}(max_{j<=i<T-1} A[i][j] - A[T-1][j])``; with ``higher_is_better=False`` it is the increase over the
    lowest earlier value, ``mean_j(A[T-1][j] - min_{j<=i<T-1} A[i][j])``. 0.0 when T == 1.
    """
    M = _as_matrix(A)
    T = len(M)
    if T == 1:
        return 0.0
    drops = []
    for j in range(T - 1):
        history = M[j : T - 1, j]
        drops.append(history.max() - M[T - 1, j] if higher_is_better else M[T - 1, j] - history.min())
    return float(np.mean(drops))


def forward_transfer(A, random_init_scores: Sequence[float] | None, higher_is_better: bool = True) -> float | None:
    """Mean gain on each task before training on it over a reference score (positive = helped).

    ``mean_{j>=1}(A[j-1][j] - R_j)`` with ``R = random_init_scores`` (the score of the untrained starting point);
    sign flipped when ``higher_is_better=False``. None when T == 1, R is None, or any A[j-1][j] is missing.
    """
    M = _as_matrix(A)
    T = len(M)
    if T == 1 or random_init_scores is None:
        return None
    if hasattr(random_init_scores, "detach"):
        random_init_scores = random_init_scores.detach().cpu().tolist()
    R = [math.nan if r is None else float(r) for r in random_init_scores]
    if len(R) != T:
        raise ValueError(f"random_init_scores has {len(R)} entries for {T} tasks")
    gains = [M[j - 1, j] - R[j] for j in range(1, T)]
    if any(math.isnan(g) for g in gains):
        return None
    mean = float(np.mean(gains))
    return mean if higher_is_better else -mean


def summarize(A, higher_is_better: bool = True, random_init_scores: Sequence[float] | None = None) -> dict:
    """``{"acc", "bwt", "fwt", "forgetting"}`` for score matrix ``A`` (fwt None without ``random_init_scores``)."""
    return {
        "acc": average_accuracy(A),
        "bwt": backward_transfer(A, higher_is_better=higher_is_better),
        "fwt": forward_transfer(A, random_init_scores, higher_is_better=higher_is_better),
        "forgetting": forgetting(A, higher_is_better=higher_is_better),
    }
