"""Error bars for the frontier: paired bootstrap intervals over the evaluation blocks, and the token budget they need.

Data of one run (kept per evaluation block, :func:`block_losses`):

- ``loss[s][j][b]``: mean loss of evaluation block ``b`` of domain ``j`` after stage ``s`` (stage 0: before
  training, stage ``i``: after domain ``i``, ``i = 1..T``); domain ``j`` has ``n_j`` blocks, the same at every stage;
- ``general[s][b]``: the same for general text (``n_g`` blocks).

``M[s][j] = mean_b loss[s][j][b]`` and ``G[s] = mean_b general[s][b]`` (equal block weights; pass ``weights`` --
label-token counts -- for a token-weighted mean, as the runner's losses are for MLM). The three metrics
(the runner's ``results.json`` names):

- ``in_domain_loss = mean_{i=1..T} M[i][i-1]`` (each domain right after training on it);
- ``forgetting = mean_{j<T-1} (M[T][j] - min_{j+1<=s<=T-1} M[s][j])``
  (:func:`hf_softmask.continual_metrics.forgetting` of the T x T matrix ``M[1:]``, lower is better);
- ``general_loss_increase = G[T] - G[0]``.

Paired bootstrap: one resample draws, for every domain ``j`` and then for general text, ``n_j`` block indices
with replacement -- ``numpy.random.default_rng(seed).integers(0, n_j, size=(R, n_j))``, domains in order, general
text last -- and uses the SAME indices at every stage and for every run compared, so the differences keep the
pairing (both runs were evaluated on the same blocks; block-to-block difficulty cancels). The interval is the
percentile interval ``numpy.quantile(d, [(1-c)/2, (1+c)/2])`` (linear interpolation) of the ``R`` resampled
differences ``d``; the estimate is the difference on the original blocks.

Frontier rule: the ncl frontier is the piecewise-linear curve through the non-dominated ncl runs'
``(in_domain_loss, metric)`` points sorted by in-domain loss (a plain run worse on both is not on it), flat from
the last of them up to the largest ncl in-domain loss, recomputed in every resample; the gap of a run is its metric
minus the frontier's value at the run's in-domain loss (undefined outside the ncl runs' in-domain range). A run is
**beyond** the frontier only when the whole interval of the forgetting gap lies below 0, **behind** when it lies
above 0, and **inside** when it contains 0; undecided (None) when the gap is undefined on the original blocks or in
more than 5% of the resamples.

Token budget (normal approximation): the half-width of a ``c`` interval of a mean over ``n`` blocks of standard
deviation ``s`` is ``z * s / sqrt(n)``, ``z = Phi^{-1}((1 + c) / 2)`` (1.96 at 95%). A half-width ``h`` needs
``n = ceil((z * s / h)^2)`` blocks; for a mean of ``G`` domain means with ``n`` blocks each (in-domain loss:
``G = T``) the variance is ``mean_j s_j^2 / (G * n)``, so ``n = ceil(z^2 * mean_j s_j^2 / (G * h^2))`` blocks per
domain. For a paired difference use ``s`` of the per-block differences. Tokens = blocks * tokens per block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import torch

from .continual_metrics import forgetting

__all__ = [
    "METRICS",
    "RunBlocks",
    "beyond_frontier",
    "block_losses",
    "blocks_for_halfwidth",
    "frontier_gap_ci",
    "frontier_intervals",
    "frontier_verdict",
    "metric_ci",
    "paired_difference_ci",
    "resample_indices",
    "run_metrics",
]

METRICS = ("in_domain_loss", "forgetting", "general_loss_increase")
UNDEFINED_LIMIT = 0.05


class RunBlocks:
    """Per-block held-out losses of one complete run (see the module docstring for the layout)."""

    def __init__(
        self,
        loss: Sequence,
        general: Sequence,
        weights: Sequence | None = None,
        general_weights: Sequence | None = None,
    ):
        S = len(loss)
        T = len(loss[0]) if S else 0
        if T < 1 or S != T + 1:
            raise ValueError(
                f"expected loss[stage][domain][block] with T + 1 stages for T domains, got {S} stages "
                f"and {T} domains (intervals need a complete run)"
            )
        # domain[j]: [S, n_j]; a ragged stage (a block count that changes between stages) is refused by numpy's shape.
        self.domain = [self._matrix([loss[s][j] for s in range(S)], f"domain {j}") for j in range(T)]
        self.general = self._matrix(general, "general text")
        if len(self.general) != S:
            raise ValueError(f"general has {len(self.general)} stages, loss has {S}")
        self.domain_w = (
            [np.asarray(w, dtype=np.float64) for w in weights]
            if weights is not None
            else [np.ones(d.shape[1]) for d in self.domain]
        )
        self.general_w = (
            np.asarray(general_weights, dtype=np.float64)
            if general_weights is not None
            else np.ones(self.general.shape[1])
        )
        if [len(w) for w in self.domain_w] != self.block_counts[:-1] or len(self.general_w) != self.block_counts[-1]:
            raise ValueError("weights must give one value per evaluation block of each domain and of general text")

    @classmethod
    def from_results(cls, results: dict) -> RunBlocks:
        """From a run's ``results.json`` holding ``eval_block_losses`` [stage][domain][block] (stage 0: before
        training), ``general_block_losses`` [stage][block] and, optionally, the label-token counts
        ``eval_block_tokens`` [domain][block] and ``general_block_tokens`` [block] (then token-weighted means)."""
        missing = [k for k in ("eval_block_losses", "general_block_losses") if k not in results]
        if missing:
            raise KeyError(f"results lack per-block losses {missing}: the run was made without keeping them")
        return cls(
            results["eval_block_losses"],
            results["general_block_losses"],
            results.get("eval_block_tokens"),
            results.get("general_block_tokens"),
        )

    @classmethod
    def mean(cls, runs: Sequence[RunBlocks]) -> RunBlocks:
        """Block-wise mean over runs on the same blocks (the seeds of one setting), weights from the first run."""
        _check_paired(runs)
        first = runs[0]
        S = first.general.shape[0]
        loss = [[np.mean([r.domain[j][s] for r in runs], axis=0) for j in range(first.num_domains)] for s in range(S)]
        general = np.mean([r.general for r in runs], axis=0)
        return cls(loss, general, first.domain_w, first.general_w)

    @staticmethod
    def _matrix(rows, what: str) -> np.ndarray:
        try:
            m = np.asarray(rows, dtype=np.float64)
        except ValueError:
            raise ValueError(f"{what}: every stage must hold the same evaluation blocks") from None
        if m.ndim != 2 or m.shape[1] < 1:
            raise ValueError(f"{what}: expected [stage][block] losses, got shape {m.shape}")
        return m

    @property
    def num_domains(self) -> int:
        return len(self.domain)

    @property
    def block_counts(self) -> list[int]:
        """Blocks per domain, then general text."""
        return [d.shape[1] for d in self.domain] + [self.general.shape[1]]


def resample_indices(block_counts: Sequence[int], n_resamples: int, seed: int = 0) -> list[np.ndarray]:
    """One ``[R, n]`` index array per entry of ``block_counts`` (domains in order, general text last)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, size=(n_resamples, n)) for n in block_counts]


def _wmean(values: np.ndarray, w: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
    """Weighted mean over blocks of ``values`` [S, n] -> [S] (idx None) or [S, R] (blocks ``idx`` [R, n])."""
    if idx is None:
        return (values * w).sum(-1) / w.sum()
    wi = w[idx]  # [R, n]
    return (values[:, idx] * wi).sum(-1) / wi.sum(-1)


def run_metrics(run: RunBlocks, indices: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The three metrics on the original blocks (scalars, ``indices=None``) or on each resample (arrays [R])."""
    T = run.num_domains
    M = np.stack(
        [
            _wmean(d, w, None if indices is None else indices[j])
            for j, (d, w) in enumerate(zip(run.domain, run.domain_w))
        ],
        axis=1,
    )  # [S, T] or [S, T, R]
    G = _wmean(run.general, run.general_w, None if indices is None else indices[-1])  # [S] or [S, R]
    if indices is None:
        M, G = M[..., None], G[..., None]
    in_domain = np.mean([M[i, i - 1] for i in range(1, T + 1)], axis=0)
    forg = np.array([forgetting(M[1:, :, r], higher_is_better=False) for r in range(M.shape[-1])])
    out = {"in_domain_loss": in_domain, "forgetting": forg, "general_loss_increase": G[T] - G[0]}
    return {k: float(v[0]) for k, v in out.items()} if indices is None else out


def _interval(estimate: float, samples: np.ndarray, confidence: float) -> dict:
    """Estimate and percentile interval; a value that does not exist (a gap outside the frontier's range) is None."""
    finite = samples[np.isfinite(samples)]
    undefined = 1.0 - len(finite) / len(samples)
    low, high = np.quantile(finite, [(1 - confidence) / 2, (1 + confidence) / 2]) if len(finite) else (None, None)
    return {
        "estimate": float(estimate) if math.isfinite(estimate) else None,
        "low": None if low is None else float(low),
        "high": None if high is None else float(high),
        "undefined_fraction": undefined,
    }


def _check_paired(runs: Sequence[RunBlocks]) -> list[int]:
    counts = runs[0].block_counts
    for r in runs[1:]:
        if r.block_counts != counts:
            raise ValueError(
                f"paired intervals need the same evaluation blocks in every run: block counts {counts} "
                f"vs {r.block_counts}"
            )
    return counts


def paired_difference_ci(
    a: RunBlocks, b: RunBlocks, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, dict]:
    """Per metric, the estimate and paired percentile interval of ``metric(a) - metric(b)``."""
    idx = resample_indices(_check_paired([a, b]), n_resamples, seed)
    pa, pb, sa, sb = run_metrics(a), run_metrics(b), run_metrics(a, idx), run_metrics(b, idx)
    return {m: _interval(pa[m] - pb[m], sa[m] - sb[m], confidence) for m in METRICS}


def metric_ci(run: RunBlocks, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """Per metric, the estimate and percentile interval of one run (its evaluation noise alone)."""
    idx = resample_indices(run.block_counts, n_resamples, seed)
    point, samples = run_metrics(run), run_metrics(run, idx)
    return {m: _interval(point[m], samples[m], confidence) for m in METRICS}


def _frontier_value(x, frontier_x: np.ndarray, frontier_y: np.ndarray) -> np.ndarray:
    """The frontier at x [R], resample by resample: the piecewise-linear curve through the non-dominated points of
    (frontier_x, frontier_y) [F, R] (lower is better on both; the point rule's ``frontier.pareto_front``), flat to
    the right of its last point up to the largest frontier_x (a plain run with more loss there was no better);
    NaN outside [min, max] of frontier_x."""
    out = np.full(np.shape(x), math.nan)
    for r in range(len(out)):
        order = np.lexsort((frontier_y[:, r], frontier_x[:, r]))  # by x, ties by y
        px, py = frontier_x[order, r], frontier_y[order, r]
        keep = np.concatenate([[True], py[1:] < np.minimum.accumulate(py)[:-1]])  # better y than every lower x
        if x[r] <= px[-1]:
            out[r] = np.interp(x[r], px[keep], py[keep], left=math.nan, right=py[keep][-1])
    return out


def frontier_gap_ci(
    run: RunBlocks, frontier: Sequence[RunBlocks], n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, dict]:
    """Gap of ``run`` to the ncl frontier at its in-domain loss, for forgetting and general-loss increase, with the
    paired interval and the verdict (:func:`frontier_verdict`) of each."""
    if len(frontier) < 2:
        raise ValueError(f"the frontier needs >= 2 ncl runs (learning rates), got {len(frontier)}")
    idx = resample_indices(_check_paired([run, *frontier]), n_resamples, seed)
    point, samples = run_metrics(run), run_metrics(run, idx)
    fpoint = [run_metrics(f) for f in frontier]
    fsamples = [run_metrics(f, idx) for f in frontier]
    out = {}
    for m in ("forgetting", "general_loss_increase"):
        est = (
            point[m]
            - _frontier_value(
                np.array([point["in_domain_loss"]]),
                np.array([[f["in_domain_loss"]] for f in fpoint]),
                np.array([[f[m]] for f in fpoint]),
            )[0]
        )
        gaps = samples[m] - _frontier_value(
            samples["in_domain_loss"],
            np.stack([f["in_domain_loss"] for f in fsamples]),
            np.stack([f[m] for f in fsamples]),
        )
        ci = _interval(float(est), gaps, confidence)
        ci["verdict"] = frontier_verdict(ci)
        out[m] = ci
    return out


def frontier_verdict(ci: dict) -> str | None:
    """``"beyond"`` (interval below 0), ``"behind"`` (above 0), ``"inside"`` (contains 0), None (undecided)."""
    if ci["estimate"] is None or not math.isfinite(ci["estimate"]) or ci["undefined_fraction"] > UNDEFINED_LIMIT:
        return None
    if ci["high"] < 0:
        return "beyond"
    if ci["low"] > 0:
        return "behind"
    return "inside"


def beyond_frontier(verdict: str | None) -> bool | None:
    """The frontier table's flag: True only for ``"beyond"``; False for ``"inside"``/``"behind"``; None undecided."""
    return None if verdict is None else verdict == "beyond"


def frontier_intervals(
    runs: dict[str, RunBlocks],
    frontier: Sequence[str],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """For every run: its metrics with intervals; for every run not on the frontier also the gaps to the frontier
    (``forgetting_gap``, ``general_gap``, :func:`frontier_gap_ci`) and ``beyond_frontier`` (of the forgetting gap).

    ``runs``: label -> per-block losses (seeds already averaged with :meth:`RunBlocks.mean`); ``frontier``: the
    labels of the ncl runs (one per learning rate). All runs must share the evaluation blocks.
    """
    unknown = [f for f in frontier if f not in runs]
    if unknown:
        raise KeyError(f"frontier runs {unknown} not among the runs {sorted(runs)}")
    base = [runs[f] for f in frontier]
    out = {}
    for label, run in runs.items():
        entry = {"metrics": metric_ci(run, n_resamples, confidence, seed)}
        if label not in frontier:
            gaps = frontier_gap_ci(run, base, n_resamples, confidence, seed)
            entry.update(
                forgetting_gap=gaps["forgetting"],
                general_gap=gaps["general_loss_increase"],
                beyond_frontier=beyond_frontier(gaps["forgetting"]["verdict"]),
            )
        out[label] = entry
    return out


def blocks_for_halfwidth(
    values, halfwidth: float = 0.01, confidence: float = 0.95, tokens_per_block: int | None = None
) -> dict:
    """Evaluation blocks (per domain) for a ``confidence`` interval of half-width ``halfwidth`` nats.

    ``values``: per-block losses (or per-block paired differences) of one domain, or a list of such arrays, one per
    domain, for a mean over those domains (see the module docstring). Returns ``{"blocks", "tokens", "sd", "z"}``
    (``tokens`` None without ``tokens_per_block``; ``sd`` the pooled per-block standard deviation, ddof=1).
    """
    groups = (
        [np.asarray(v, dtype=np.float64) for v in values]
        if np.ndim(values[0])
        else [np.asarray(values, dtype=np.float64)]
    )
    if any(len(g) < 2 for g in groups):
        raise ValueError("need >= 2 blocks per domain to estimate the per-block variance")
    var = float(np.mean([g.var(ddof=1) for g in groups]))
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    blocks = max(1, math.ceil(z * z * var / (len(groups) * halfwidth * halfwidth)))
    return {
        "blocks": blocks,
        "tokens": None if tokens_per_block is None else blocks * tokens_per_block,
        "sd": math.sqrt(var),
        "z": z,
    }


@torch.no_grad()
def block_losses(model, eval_set, causal: bool) -> tuple[list[float], list[int]]:
    """Per-block mean loss and label-token count of every row of ``eval_set`` (a FixedEvalSet or list of batches).

    The loss is the model's LM loss per row: cross-entropy over the tokens with a label (``!= -100``), labels
    shifted by one for a causal LM -- what transformers' ``ForCausalLMLoss`` / masked-LM loss average over a batch,
    so the token-weighted mean of these rows is ``lm_eval_loss``. A row without label tokens gets loss 0 and count
    0: pass the counts as ``RunBlocks`` weights (MLM) so it counts for nothing. Eval mode; the mode is restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, tokens = [], []
    try:
        for batch in getattr(eval_set, "batches", eval_set):
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            n = (labels != -100).sum(-1)
            losses += (ce.sum(-1) / n.clamp(min=1)).tolist()
            tokens += n.tolist()
    finally:
        model.train(was_training)
    return losses, tokens
