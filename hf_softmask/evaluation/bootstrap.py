"""Error bars for the frontier: a document bootstrap paired across runs, a seed jackknife, and the verdicts.

Data of one run (kept per evaluation block, :func:`block_losses`):

- ``loss[s][j][b]``: mean loss of evaluation block ``b`` of domain ``j`` after stage ``s`` (stage 0: before
  training, stage ``i``: after domain ``i``, ``i = 1..T``); domain ``j`` has ``n_j`` blocks, the same at every stage;
- ``general[s][b]``: the same for general text;
- ``docs[j][b]`` / ``general_docs[b]``: the held-out document block ``b`` was cut from (without them every block
  is its own document: the old evaluation, whose blocks came from a few documents and are not independent).

``M[s][j]`` is the token-weighted mean of domain ``j``'s blocks and ``G[s]`` of general text's. The three metrics
(the runner's ``results.json`` names):

- ``in_domain_loss = mean_{i=1..T} M[i][i-1]`` (each domain right after training on it);
- ``forgetting = mean_{j<T-1} (M[T][j] - min_{j+1<=s<=T-1} M[s][j])``
  (:func:`hf_softmask.evaluation.continual_metrics.forgetting` of the T x T matrix ``M[1:]``, lower is better);
- ``general_loss_increase = G[T] - G[0]``.

What varies, and how each source enters an interval (:class:`Study`):

- **documents** (which held-out articles the domain happened to get): resampled as clusters. One resample draws,
  for every domain and then for general text, as many documents as it has, with replacement --
  ``numpy.random.default_rng(seed).integers(0, D_g, size=(R, D_g))`` per group, domains in order, general text
  last -- and a block counts as often as its document was drawn (times its label tokens). The SAME draw serves every
  stage, every seed and every run, so differences keep the pairing. ``V_doc`` = variance of the ``R`` resampled
  statistics (ddof 1); its degrees of freedom are Satterthwaite's over the groups, ``(sum_g V_g)^2 / sum_g (V_g^2 /
  (D_g - 1))``, ``V_g`` the variance when the same draws resample group ``g`` alone, ``D_g`` its documents;
- **training noise** (the seed): the runs of one row (strategy, learning rate) differ in seed only, and seed ``k``
  of every row is one replicate of the whole study (same data order), so the seeds are a paired level. With the
  seeds ``k = 1..K`` that every row has (``K >= 2``), the jackknife drops seed ``k`` from every row at once:
  ``V_seed = (K-1)/K * sum_k (t_(-k) - mean_k t_(-k))^2``, ``K - 1`` degrees of freedom (for a mean over seeds this is
  exactly ``s^2 / K``). With one seed training noise is not in the interval, and the design says so.

The interval is ``t ± q * sqrt(V_doc + V_seed)``, ``q`` the ``(1 + c) / 2`` quantile of Student's t with
Welch-Satterthwaite degrees of freedom ``(V_doc + V_seed)^2 / (V_doc^2 / (D - 1) + (V_seed / m)^2 / (K - 1))``, at
least ``K - 1``, where ``m`` is the median of chi2(K - 1) / (K - 1) (:func:`_degrees_of_freedom` says why); the
p-value is the matching two-sided t test of 0. (Documents and seeds are crossed, not nested: the two variances
each carry the document-by-seed interaction once, so the sum is slightly conservative.) Calibration by simulation
is in tests/test_frontier_calibration.py.

Frontier rule: the ncl frontier is the piecewise-linear curve through the non-dominated ncl rows'
``(in_domain_loss, metric)`` points sorted by in-domain loss (a plain row worse on both is not on it), flat from
the last of them up to the largest ncl in-domain loss, recomputed for every resample and jackknife replicate; the
gap of a row is its metric minus the frontier's value at the row's in-domain loss (undefined outside the ncl rows'
in-domain range). A gap is undecided (None) when undefined on the original data or in more than 5% of the
resamples.

Verdicts (:func:`frontier_verdicts`): the raw interval says **beyond** (below 0), **behind** (above 0) or
**inside**; the verdict a table reports is adjusted for multiplicity -- the primary comparison named in advance is
tested at level ``1 - c`` alone (Holm within it when it names several rates), every other row by Holm's step-down
over all other rows (:func:`holm`). A beyond or behind verdict that does not survive dropping any one frontier
learning rate (Holm recomputed with that row's new p-value) is **fragile**, naming the rate.

Token budget (normal approximation, :func:`blocks_for_halfwidth`): the half-width of a ``c`` interval of a mean
over ``n`` independent units of standard deviation ``s`` is ``z * s / sqrt(n)``; a half-width ``h`` needs
``n = ceil(z^2 * mean_j s_j^2 / (G * h^2))`` units per group for a mean of ``G`` group means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import numpy as np
import torch

__all__ = [
    "METRICS",
    "RunBlocks",
    "Study",
    "beyond_frontier",
    "block_losses",
    "blocks_for_halfwidth",
    "frontier_verdicts",
    "holm",
    "run_metrics",
]

METRICS = ("in_domain_loss", "forgetting", "general_loss_increase")
GAP_METRICS = ("forgetting", "general_loss_increase")
UNDEFINED_LIMIT = 0.05


class RunBlocks:
    """Per-block held-out losses of one complete run (see the module docstring for the layout)."""

    def __init__(
        self,
        loss: Sequence,
        general: Sequence,
        weights: Sequence | None = None,
        general_weights: Sequence | None = None,
        docs: Sequence[Sequence[str]] | None = None,
        general_docs: Sequence[str] | None = None,
        seed: int | None = None,
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
        self.by_document = docs is not None and general_docs is not None
        if self.by_document:
            self.docs = [[str(d) for d in ds] for ds in docs] + [[str(d) for d in general_docs]]
        else:  # the old evaluation: every block its own unit
            self.docs = [[f"block{b}" for b in range(n)] for n in self.block_counts]
        if [len(d) for d in self.docs] != self.block_counts:
            raise ValueError("docs must name one document per evaluation block of each domain and of general text")
        self.seed = seed

    @classmethod
    def from_results(cls, results: dict) -> RunBlocks:
        """From a run's ``results.json``: ``eval_block_losses`` [stage][domain][block] (stage 0: before training),
        ``general_block_losses`` [stage][block], the label-token counts ``eval_block_tokens`` /
        ``general_block_tokens`` (token-weighted means) and, for runs evaluated by document, ``eval_block_docs`` /
        ``general_block_docs``."""
        missing = [k for k in ("eval_block_losses", "general_block_losses") if k not in results]
        if missing:
            raise KeyError(f"results lack per-block losses {missing}: the run was made without keeping them")
        return cls(
            results["eval_block_losses"],
            results["general_block_losses"],
            results.get("eval_block_tokens"),
            results.get("general_block_tokens"),
            results.get("eval_block_docs"),
            results.get("general_block_docs"),
            results.get("seed"),
        )

    @classmethod
    def mean(cls, runs: Sequence[RunBlocks]) -> RunBlocks:
        """Block-wise mean over runs on the same blocks (the seeds of one setting), weights from the first run."""
        _check_paired(runs)
        first = runs[0]
        if len(runs) == 1:
            return first
        S = first.general.shape[0]
        loss = [[np.mean([r.domain[j][s] for r in runs], axis=0) for j in range(first.num_domains)] for s in range(S)]
        general = np.mean([r.general for r in runs], axis=0)
        docs = (first.docs[:-1], first.docs[-1]) if first.by_document else (None, None)
        return cls(loss, general, first.domain_w, first.general_w, *docs)

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

    @property
    def block_weights(self) -> list[np.ndarray]:
        """Label-token weights per domain, then general text."""
        return [*self.domain_w, self.general_w]


def _check_paired(runs: Sequence[RunBlocks]) -> None:
    first = runs[0]
    for r in runs[1:]:
        same_tokens = r.block_counts == first.block_counts and all(
            np.array_equal(x, y) for x, y in zip(r.block_weights, first.block_weights)
        )
        if not same_tokens or r.docs != first.docs:
            raise ValueError(
                "paired intervals need the same evaluation blocks and documents in every run: block counts "
                f"{first.block_counts} vs {r.block_counts}"
                + ("" if r.block_counts != first.block_counts else " (same counts, other documents or label tokens)")
            )


def _cluster_weights(run: RunBlocks, n_resamples: int, seed: int) -> list[np.ndarray]:
    """Per group (domains, then general text), ``[R, n]`` block weights of ``R`` document resamples: label tokens
    times how often the block's document was drawn (the draw of the module docstring)."""
    rng = np.random.default_rng(seed)
    out = []
    for docs, w in zip(run.docs, run.block_weights):
        names, cluster = np.unique(np.asarray(docs), return_inverse=True)
        draws = rng.integers(0, len(names), size=(n_resamples, len(names)))
        counts = np.zeros((n_resamples, len(names)))
        np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
        out.append(counts[:, cluster] * w[None, :])
    return out


def _group_means(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted block means of ``values`` [S, n]: ``w`` [n] -> [S, 1], ``w`` [R, n] -> [S, R]."""
    w2 = w[None, :] if w.ndim == 1 else w
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values @ w2.T) / w2.sum(axis=1)[None, :]


def _forgetting(A: np.ndarray) -> np.ndarray:
    """:func:`~hf_softmask.evaluation.continual_metrics.forgetting` (lower is better) of ``A`` [T, T, R],
    vectorised over R."""
    T = A.shape[0]
    if T == 1:
        return np.zeros(A.shape[-1])
    drops = [A[T - 1, j] - A[j : T - 1, j].min(axis=0) for j in range(T - 1)]
    return np.mean(drops, axis=0)


def run_metrics(run: RunBlocks, weights: Sequence[np.ndarray] | None = None) -> dict:
    """The three metrics on the original blocks (floats, ``weights=None``) or per resample (``weights``: one
    ``[R, n]`` array per group, :func:`_cluster_weights`; arrays [R])."""
    W = run.block_weights if weights is None else weights
    T = run.num_domains
    M = np.stack([_group_means(d, w) for d, w in zip(run.domain, W[:-1])], axis=1)  # [S, T, R]
    G = _group_means(run.general, W[-1])  # [S, R]
    out = {
        "in_domain_loss": np.mean([M[i, i - 1] for i in range(1, T + 1)], axis=0),
        "forgetting": _forgetting(M[1:]),
        "general_loss_increase": G[T] - G[0],
    }
    return {k: float(v[0]) for k, v in out.items()} if weights is None else out


def _frontier_value(x, frontier_x: np.ndarray, frontier_y: np.ndarray) -> np.ndarray:
    """The frontier at x [R], resample by resample: the piecewise-linear curve through the non-dominated points of
    (frontier_x, frontier_y) [F, R] (lower is better on both; the point rule's ``frontier.pareto_front``), flat to
    the right of its last point up to the largest frontier_x (a plain run with more loss there was no better);
    NaN outside [min, max] of frontier_x."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    out = np.full(x.shape, math.nan)
    for r in range(len(out)):
        px_all, py_all = frontier_x[:, r], frontier_y[:, r]
        ok = np.isfinite(px_all) & np.isfinite(py_all)
        if ok.sum() < 1 or not math.isfinite(x[r]):
            continue
        order = np.lexsort((py_all[ok], px_all[ok]))  # by x, ties by y
        px, py = px_all[ok][order], py_all[ok][order]
        keep = np.concatenate([[True], py[1:] < np.minimum.accumulate(py)[:-1]])  # better y than every lower x
        if x[r] <= px[-1]:
            out[r] = np.interp(x[r], px[keep], py[keep], left=math.nan, right=py[keep][-1])
    return out


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjusted p-values: sorted ascending, ``p_adj(i) = max_{k<=i} min(1, (m - k + 1) p(k))``
    (``m`` = the p-values that are not None; None stays None)."""
    items = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda t: t[0])
    m, out, running = len(items), {k: None for k in pvalues}, 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def _degrees_of_freedom(v_doc: float, df_doc: int, v_seed: float, df_seed: int) -> float:
    """Welch-Satterthwaite degrees of freedom of ``v_doc + v_seed``, the seed variance taken at its median-unbiased
    value ``v_seed / q`` (``q`` the median of chi2(df_seed) / df_seed) and the result at least ``df_seed``.

    Why: the plain plug-in is biased towards many degrees of freedom exactly when the seed variance came out small
    by chance, which is when the interval is already too narrow -- with 3 seeds and a fifth of the variance from
    documents it gave 7.6% false verdicts at 5% nominal; this rule gives 4.4-5.0% for 3-5 seeds at every share
    (tests/test_frontier_calibration.py, docs/statistics.md)."""
    from scipy.stats import chi2

    if df_seed < 1 or v_seed <= 0:
        return float(df_doc)
    v_seed_df = v_seed / (chi2.ppf(0.5, df_seed) / df_seed)
    denom = v_doc**2 / df_doc + v_seed_df**2 / df_seed
    return max(float(df_seed), (v_doc + v_seed) ** 2 / denom)


def _t_quantile(q: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df)) if math.isfinite(df) else NormalDist().inv_cdf(q)


def _t_pvalue(stat: float, df: float) -> float:
    from scipy.stats import t

    return float(2 * t.sf(abs(stat), df)) if math.isfinite(df) else 2 * (1 - NormalDist().cdf(abs(stat)))


class Study:
    """Every row of a study (label -> its per-seed runs) on shared evaluation documents, and inference on any
    statistic of them (module docstring): point estimate, document-resampling and seed-jackknife variances, the
    t interval and p-value.

    ``unit``: ``"document"`` resamples documents (the runs must name them), ``"block"`` every block alone (the old
    evaluation; its intervals are too narrow when blocks share documents -- kept to read old runs and to show it).
    ``seed_level``: include training noise through the seeds that every row has (needs >= 2 of them).
    """

    def __init__(
        self,
        rows: Mapping[str, Sequence[RunBlocks]],
        n_resamples: int = 2000,
        confidence: float = 0.95,
        seed: int = 0,
        unit: str = "document",
        seed_level: bool = True,
    ):
        if not rows:
            raise ValueError("a study needs at least one row")
        self.rows = {k: list(v) for k, v in rows.items()}
        runs = [r for v in self.rows.values() for r in v]
        if any(not v for v in self.rows.values()):
            raise ValueError("every row needs at least one run")
        _check_paired(runs)
        first = runs[0]
        if unit not in ("document", "block"):
            raise ValueError(f"unit must be 'document' or 'block', got {unit!r}")
        if unit == "document" and not first.by_document:
            raise ValueError(
                "unit='document' needs runs evaluated by document (eval_block_docs in results.json); these runs "
                "kept only blocks: read them with unit='block' (intervals too narrow when blocks share documents)"
            )
        if unit == "block":
            first = RunBlocks(
                [[d[s] for d in first.domain] for s in range(len(first.general))],
                first.general,
                first.domain_w,
                first.general_w,
            )
        self.unit, self.n_resamples, self.confidence, self.seed = unit, n_resamples, confidence, seed
        self.weights = _cluster_weights(first, n_resamples, seed)
        # The same draws, one group at a time (the others at their original weights): each group's share of the
        # document variance, for the degrees of freedom.
        self.group_weights = [
            [
                w if h == g else np.broadcast_to(o, w.shape)
                for h, (w, o) in enumerate(zip(self.weights, first.block_weights))
            ]
            for g in range(len(self.weights))
        ]
        self.units = [len(set(d)) for d in first.docs]
        seed_sets = [{r.seed for r in v} for v in self.rows.values()]
        common = set.intersection(*seed_sets) if all(None not in s for s in seed_sets) else set()
        self.seeds = sorted(common) if seed_level and len(common) >= 2 else []
        self._cache: dict = {}

    # -- metrics of a row, cached -------------------------------------------------------------------------------
    def metrics(self, label: str, resampled: bool | int = False, drop_seed: int | None = None) -> dict:
        """Row ``label``'s metrics: on the original data, on the document resamples (``resampled=True``), on the
        resamples of group ``resampled`` alone (an int), or without seed ``drop_seed``."""
        key = (label, repr(resampled), drop_seed)  # repr: False == 0 as dict keys, group 0 is not the original
        if key not in self._cache:
            runs = [r for r in self.rows[label] if drop_seed is None or r.seed != drop_seed] or self.rows[label]
            weights = None
            if resampled is True:
                weights = self.weights
            elif resampled is not False:
                weights = self.group_weights[resampled]
            self._cache[key] = run_metrics(RunBlocks.mean(runs), weights)
        return self._cache[key]

    # -- inference ------------------------------------------------------------------------------------------------
    def infer(self, statistic: Callable[[Callable[[str], dict]], float | np.ndarray]) -> dict:
        """Inference on ``statistic(get)``, where ``get(label)`` returns that row's metrics (floats on the original
        data, arrays [R] on the resamples). Returns estimate, low, high, p (two-sided, of 0), se, df, the variance
        components and the fraction of resamples where the statistic is undefined (NaN)."""
        est = float(np.asarray(statistic(lambda k: self.metrics(k))).reshape(-1)[0])
        samples = np.asarray(statistic(lambda k: self.metrics(k, resampled=True)), dtype=np.float64)
        finite = samples[np.isfinite(samples)]
        undefined = 1.0 - len(finite) / len(samples)
        v_doc = float(np.var(finite, ddof=1)) if len(finite) > 1 else math.nan
        v_seed, k = 0.0, len(self.seeds)
        if k >= 2:
            jack = np.array(
                [
                    float(np.asarray(statistic(lambda lab, s=s: self.metrics(lab, drop_seed=s))).reshape(-1)[0])
                    for s in self.seeds
                ]
            )
            jack = jack[np.isfinite(jack)]
            v_seed = float((len(jack) - 1) / len(jack) * np.sum((jack - jack.mean()) ** 2)) if len(jack) > 1 else 0.0
        out = {
            "estimate": est if math.isfinite(est) else None,
            "low": None,
            "high": None,
            "p": None,
            "se": None,
            "df": None,
            "var_documents": v_doc if math.isfinite(v_doc) else None,
            "var_seeds": v_seed if k >= 2 else None,
            "undefined_fraction": undefined,
        }
        if not math.isfinite(est) or not math.isfinite(v_doc):
            return out
        var = v_doc + v_seed
        df = _degrees_of_freedom(v_doc, self._document_df(statistic), v_seed, k - 1 if k >= 2 else 0)
        se = math.sqrt(var)
        q = _t_quantile((1 + self.confidence) / 2, df)
        p = _t_pvalue(est / se, df) if se > 0 else (0.0 if est != 0 else 1.0)
        out.update(low=est - q * se, high=est + q * se, p=p, se=se, df=df)
        return out

    def _document_df(self, statistic) -> float:
        """Satterthwaite's degrees of freedom of the document variance, a sum over the independently resampled
        groups: ``(sum_g V_g)^2 / sum_g V_g^2 / (D_g - 1)``, ``V_g`` the variance with group ``g`` alone resampled
        (a statistic of one domain gets that domain's ``D - 1``; general text's few documents do not limit it)."""
        parts = []
        for g, units in enumerate(self.units):
            values = np.asarray(statistic(lambda k, g=g: self.metrics(k, resampled=g)), dtype=np.float64)
            values = values[np.isfinite(values)]
            if len(values) > 1 and units > 1:
                parts.append((float(np.var(values, ddof=1)), units - 1))
        total = sum(v for v, _ in parts)
        denom = sum(v * v / d for v, d in parts)
        return total * total / denom if denom > 0 else float(max(min(self.units) - 1, 1))

    def metric_intervals(self, label: str) -> dict[str, dict]:
        """Per metric, the row's estimate and interval."""
        return {m: self.infer(lambda get, m=m: get(label)[m]) for m in METRICS}

    def difference(self, a: str, b: str) -> dict[str, dict]:
        """Per metric, ``metric(a) - metric(b)`` with its paired interval."""
        return {m: self.infer(lambda get, m=m: np.asarray(get(a)[m]) - np.asarray(get(b)[m])) for m in METRICS}

    def gap(self, label: str, frontier: Sequence[str], metric: str = "forgetting") -> dict:
        """``metric`` of row ``label`` minus the frontier of rows ``frontier`` at the row's in-domain loss."""
        if len(frontier) < 2:
            raise ValueError(f"the frontier needs >= 2 ncl rows (learning rates), got {len(frontier)}")

        def statistic(get):
            row = get(label)
            fx = np.array([np.atleast_1d(get(f)["in_domain_loss"]) for f in frontier])
            fy = np.array([np.atleast_1d(get(f)[metric]) for f in frontier])
            return np.atleast_1d(row[metric]) - _frontier_value(np.atleast_1d(row["in_domain_loss"]), fx, fy)

        ci = self.infer(statistic)
        ci["verdict"] = _raw_verdict(ci)
        return ci


def _raw_verdict(ci: dict) -> str | None:
    """``"beyond"`` (interval below 0), ``"behind"`` (above 0), ``"inside"``, None (undecided: module docstring)."""
    if ci["estimate"] is None or ci["low"] is None or ci["undefined_fraction"] > UNDEFINED_LIMIT:
        return None
    if ci["high"] < 0:
        return "beyond"
    if ci["low"] > 0:
        return "behind"
    return "inside"


def _adjusted_verdict(ci: dict, p_adjusted: float | None, alpha: float) -> str | None:
    if _raw_verdict(ci) is None or p_adjusted is None:
        return None
    if p_adjusted < alpha:
        return "beyond" if ci["estimate"] < 0 else "behind"
    return "inside"


def frontier_verdicts(
    study: Study,
    frontier: Sequence[str],
    rows: Sequence[str],
    primary: Sequence[str] = (),
    metric: str = "forgetting",
) -> dict[str, dict]:
    """Gap, raw interval and adjusted verdict of every row in ``rows`` against the frontier rows (module
    docstring): ``primary`` rows form their own Holm family at level ``1 - confidence``, the others one family
    together; a beyond/behind verdict that any one dropped frontier rate turns into another is ``"fragile"``
    (``fragile_without`` names the rate and what the verdict became). Returns label -> gap dict with
    ``verdict`` (raw), ``p_adjusted``, ``adjusted_verdict``, ``family``."""
    alpha = 1 - study.confidence
    gaps = {r: study.gap(r, frontier, metric) for r in rows}
    families = {"primary": [r for r in rows if r in primary], "others": [r for r in rows if r not in primary]}
    for family, members in families.items():
        adjusted = holm({r: gaps[r]["p"] if gaps[r]["verdict"] is not None else None for r in members})
        for r in members:
            g = gaps[r]
            g.update(family=family, p_adjusted=adjusted[r], adjusted_verdict=_adjusted_verdict(g, adjusted[r], alpha))
            if g["adjusted_verdict"] in ("beyond", "behind") and len(frontier) > 2:
                for dropped in frontier:
                    alt = study.gap(r, [f for f in frontier if f != dropped], metric)
                    if alt["verdict"] is None:
                        continue  # the row lies outside the thinner frontier: no evidence either way
                    ps = {m: gaps[m]["p"] if gaps[m]["verdict"] is not None else None for m in members}
                    ps[r] = alt["p"]
                    now = _adjusted_verdict(alt, holm(ps)[r], alpha)
                    if now != g["adjusted_verdict"]:
                        g["fragile_without"] = {"row": dropped, "verdict": now}
                        g["adjusted_verdict"] = "fragile"
                        break
    return gaps


def beyond_frontier(verdict: str | None) -> bool | None:
    """The frontier table's flag: True only for ``"beyond"``; False for the other verdicts; None undecided."""
    return None if verdict is None else verdict == "beyond"


def blocks_for_halfwidth(
    values, halfwidth: float = 0.01, confidence: float = 0.95, tokens_per_block: int | None = None
) -> dict:
    """Independent units (per domain) for a ``confidence`` interval of half-width ``halfwidth`` nats.

    ``values``: per-unit losses (or per-unit paired differences; a unit is a document, or a block of the old
    evaluation) of one domain, or a list of such arrays, one per domain, for a mean over those domains (see the
    module docstring). Returns ``{"blocks", "tokens", "sd", "z"}`` (``tokens`` None without ``tokens_per_block``;
    ``sd`` the pooled per-unit standard deviation, ddof=1).
    """
    groups = (
        [np.asarray(v, dtype=np.float64) for v in values]
        if np.ndim(values[0])
        else [np.asarray(values, dtype=np.float64)]
    )
    if any(len(g) < 2 for g in groups):
        raise ValueError("need >= 2 units per domain to estimate the per-unit variance")
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
    0: pass the counts as ``RunBlocks`` weights so it counts for nothing. Eval mode; the mode is restored.
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
