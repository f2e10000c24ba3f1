"""UnitImportance: per-unit importance in [0, 1] for attention heads and FFN neurons."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..utils.io import HubUploadMixin, atomic_save_safetensors, atomic_write_text

__all__ = [
    "UnitImportance",
    "ImportanceShapeError",
    "tanh_zscore",
    "normalize_importance",
    "NORMALIZATIONS",
    "DEFAULT_NORMALIZATION",
    "IMPORTANCE_WEIGHTS",
    "IMPORTANCE_CONFIG",
]

IMPORTANCE_WEIGHTS = "importance.safetensors"
IMPORTANCE_CONFIG = "importance_config.json"


class ImportanceShapeError(ValueError):
    """Importance whose shape does not match the model it is applied to."""


def _check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf; the loss it was computed from diverged")
    return x


def _warn_flat(flat: torch.Tensor, name: str, what: str) -> None:
    if flat.any():
        warnings.warn(
            f"{name}: {int(flat.sum())} {what} constant values (std = 0); their normalized importance is set to 0. "
            "This usually means the units received no gradient (frozen layer, too few batches).",
            RuntimeWarning,
            stacklevel=3,
        )


def _zscore(x: torch.Tensor, dim: int | None, name: str, unbiased: bool = False) -> torch.Tensor:
    """``(x - mean) / std`` along ``dim`` (None: over all entries), ``std`` with ``n - 1`` if ``unbiased`` else
    ``n``; constant rows give zeros, with a warning."""
    x = _check_finite(x, name)
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    mean = x.mean(dim=dims, keepdim=True)
    n = x.numel() if dim is None else x.shape[dim]
    std = x.std(dim=dims, keepdim=True, unbiased=unbiased) if n > 1 else torch.zeros_like(mean)
    flat = (std <= 0) | ~torch.isfinite(std)
    _warn_flat(flat, name, "row(s) have" if dim is not None else "tensor has only")
    z = (x - mean) / torch.where(flat, torch.ones_like(std), std)
    return z.masked_fill(flat.expand_as(z), 0.0)


def tanh_zscore(x: torch.Tensor, dim: int = -1, name: str = "importance", unbiased: bool = False) -> torch.Tensor:
    """``|tanh((x - mean) / std)|`` along ``dim`` (``std`` unbiased if ``unbiased``); rows with zero or non-finite
    std give 0 (with a warning)."""
    return torch.tanh(_zscore(x, dim, name, unbiased)).abs()


def _quantile(x: torch.Tensor, pooled: bool, name: str) -> torch.Tensor:
    """Mid-rank quantile ``(#smaller + (#equal - 1) / 2) / (n - 1)`` per row (or over all entries when ``pooled``)."""
    x = _check_finite(x, name)
    rows = x.reshape(1, -1) if pooled else x
    n = rows.shape[-1]
    ordered = rows.sort(dim=-1).values.contiguous()
    below = torch.searchsorted(ordered, rows.contiguous(), right=False)
    upto = torch.searchsorted(ordered, rows.contiguous(), right=True)
    q = (below + upto - 1).float() / 2 / max(n - 1, 1)
    flat = ordered[..., :1] == ordered[..., -1:]
    _warn_flat(flat, name, "row(s) have" if not pooled else "tensor has only")
    return q.masked_fill(flat.expand_as(q), 0.0).view_as(x)


NORMALIZATIONS: dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {
    # The published DAS map: per layer |tanh z|, z with torch.std's unbiased std as ContinualLM's impt_norm has it
    # (docs/algorithms.md §2). Not monotonic: a unit far BELOW its layer's mean gets ~1.
    "abs_tanh": lambda x, name: tanh_zscore(x, -1, name, unbiased=True),
    # One-sided: per layer tanh(z) clipped at 0; units at or below their layer's mean get 0.
    "tanh": lambda x, name: torch.tanh(_zscore(x, -1, name)).clamp_min(0.0),
    # The default. One-sided tanh of z-scores over all layers of a kind (heads, or FFN neurons) together: a unit
    # less used than another, in any layer, never gets more protection; the most stable map measured
    # (docs/importance.md).
    "pooled_tanh": lambda x, name: torch.tanh(_zscore(x, None, name)).clamp_min(0.0),
    # Per-layer mid-rank quantile in [0, 1]: uniform in every layer.
    "rank": lambda x, name: _quantile(x, False, name),
    # Mid-rank quantile over all layers of a kind together.
    "pooled_rank": lambda x, name: _quantile(x, True, name),
}
DEFAULT_NORMALIZATION = "pooled_tanh"


def normalize_importance(
    x: torch.Tensor, normalization: str = DEFAULT_NORMALIZATION, name: str = "importance"
) -> torch.Tensor:
    """Raw importance ``x[L, N]`` mapped into [0, 1] by the named normalization (see :data:`NORMALIZATIONS`)."""
    fn = NORMALIZATIONS.get(normalization)
    if fn is None:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {sorted(NORMALIZATIONS)}")
    return fn(x, name)


@dataclass
class UnitImportance(HubUploadMixin):
    """Importance of attention heads ``heads[L, H]`` and FFN neurons ``ffn[L, I]``.

    ``meta`` carries the layout signature (model type and shapes) and free-form provenance.
    """

    hub_commit_message = "Upload unit importance"

    heads: torch.Tensor
    ffn: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.heads = torch.as_tensor(self.heads).detach().float().cpu()
        self.ffn = torch.as_tensor(self.ffn).detach().float().cpu()
        if self.heads.dim() != 2 or self.ffn.dim() != 2 or self.heads.shape[0] != self.ffn.shape[0]:
            raise ImportanceShapeError(
                f"expected heads [L, H] and ffn [L, I] with the same L, got {tuple(self.heads.shape)} "
                f"and {tuple(self.ffn.shape)}"
            )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def zeros_like_layout(cls, layout) -> UnitImportance:
        return cls(
            torch.zeros(layout.num_layers, layout.num_heads),
            torch.zeros(layout.num_layers, layout.ffn_size),
            meta={"layout": layout.signature()},
        )

    # -- algebra -------------------------------------------------------------------------------
    def normalized(self, normalization: str = DEFAULT_NORMALIZATION) -> UnitImportance:
        """Heads and FFN neurons mapped into [0, 1], separately, by ``normalization`` (a key of
        :data:`NORMALIZATIONS`; ``"abs_tanh"`` is the published per-layer ``|tanh(z)|``)."""
        heads = normalize_importance(self.heads, normalization, "head importance")
        ffn = normalize_importance(self.ffn, normalization, "FFN importance")
        return UnitImportance(heads, ffn, {**self.meta, "normalization": normalization})

    def maximum(self, other: UnitImportance) -> UnitImportance:
        """Elementwise max (EMax accumulation across domains/tasks)."""
        self._check_same_shape(other)
        return UnitImportance(
            torch.maximum(self.heads, other.heads), torch.maximum(self.ffn, other.ffn), dict(self.meta)
        )

    def _check_same_shape(self, other: UnitImportance) -> None:
        if self.heads.shape != other.heads.shape or self.ffn.shape != other.ffn.shape:
            raise ImportanceShapeError(
                f"cannot combine importance of shapes heads{tuple(self.heads.shape)}/ffn{tuple(self.ffn.shape)} "
                f"and heads{tuple(other.heads.shape)}/ffn{tuple(other.ffn.shape)}"
            )

    def validate_for(self, layout) -> None:
        """Raise ImportanceShapeError unless this importance fits ``layout``."""
        want_h = (layout.num_layers, layout.num_heads)
        want_f = (layout.num_layers, layout.ffn_size)
        if tuple(self.heads.shape) != want_h or tuple(self.ffn.shape) != want_f:
            saved = self.meta.get("layout", {})
            raise ImportanceShapeError(
                f"importance has heads{tuple(self.heads.shape)} and ffn{tuple(self.ffn.shape)}, but the model "
                f"({layout.model_type}) has heads{want_h} and ffn{want_f}. "
                f"It was computed for {saved or 'an unknown model'}; "
                "recompute it with hf_softmask.compute_importance on this model."
            )
        if not (torch.isfinite(self.heads).all() and torch.isfinite(self.ffn).all()):
            raise ValueError("importance contains NaN or Inf; recompute it")
        lo = min(self.heads.min().item(), self.ffn.min().item())
        hi = max(self.heads.max().item(), self.ffn.max().item())
        if lo < 0 or hi > 1:
            raise ValueError(f"importance must lie in [0, 1] (got [{lo:.3g}, {hi:.3g}]); call .normalized() first")

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **_) -> None:
        """Write ``importance.safetensors`` and ``importance_config.json`` into ``save_directory`` (atomically)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(
            {"heads": self.heads.contiguous(), "ffn": self.ffn.contiguous()}, path / IMPORTANCE_WEIGHTS
        )
        atomic_write_text(path / IMPORTANCE_CONFIG, json.dumps(self.meta, indent=2, sort_keys=True, default=str))

    @classmethod
    def exists(cls, directory: str | os.PathLike) -> bool:
        return (Path(directory) / IMPORTANCE_WEIGHTS).is_file()

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | os.PathLike, *, layout=None, revision: str | None = None, **hub_kwargs
    ) -> UnitImportance:
        """Load from a local directory or a Hub repo id; with ``layout``, check the shapes fit.

        A name that is not a directory is looked up on the Hub only when it reads as ``owner/name``; anything else
        (a single name, ``./``, ``~``, an absolute path, an invalid repo id) that does not exist raises
        FileNotFoundError naming it, as does a repo the Hub (or, offline, its cache) does not provide.
        """
        path = Path(path_or_repo).expanduser()
        if path.is_dir():
            weights, config = path / IMPORTANCE_WEIGHTS, path / IMPORTANCE_CONFIG
            if not weights.is_file():
                raise FileNotFoundError(f"{path_or_repo}: holds no saved UnitImportance ({weights} not found)")
        elif _hub_repo_id(str(path_or_repo)):
            weights, config = _hub_files(str(path_or_repo), revision, hub_kwargs)
        else:
            raise FileNotFoundError(
                f"{path_or_repo}: no such directory (and not looked up on the Hub: not an owner/name repo id); "
                f"give the directory holding {IMPORTANCE_WEIGHTS}, e.g. a pre-training run's <k>_<domain>/ or "
                "a Trainer checkpoint"
            )
        tensors = load_file(str(weights))
        meta = json.loads(Path(config).read_text()) if Path(config).is_file() else {}
        imp = cls(tensors["heads"], tensors["ffn"], meta)
        if layout is not None:
            imp.validate_for(layout)
        return imp

    # -- summaries -----------------------------------------------------------------------------
    def split_half(self, other: UnitImportance) -> dict[str, float]:
        """Pearson correlation with ``other`` (e.g. the estimate from a disjoint half of the data), heads and FFN
        neurons separately: the stability of an estimate."""
        self._check_same_shape(other)

        def r(a: torch.Tensor, b: torch.Tensor) -> float:
            return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()

        return {"heads": r(self.heads, other.heads), "ffn": r(self.ffn, other.ffn)}

    def __repr__(self) -> str:
        return (
            f"UnitImportance(heads={tuple(self.heads.shape)}, ffn={tuple(self.ffn.shape)}, "
            f"mean={self.heads.mean():.3f}/{self.ffn.mean():.3f})"
        )


def _hub_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repo id ``owner/name`` rather than a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~")) or os.path.isabs(name) or "\\" in name or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_files(repo_id: str, revision: str | None, hub_kwargs: dict) -> tuple[str, str]:
    """The weights and config files of a UnitImportance on the Hub; FileNotFoundError naming ``repo_id`` when neither
    the Hub nor its cache provides them."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return tuple(
            hf_hub_download(repo_id, name, revision=revision, **hub_kwargs)
            for name in (IMPORTANCE_WEIGHTS, IMPORTANCE_CONFIG)
        )
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and not in the cache
        why = (
            "neither a local directory nor available offline (HF_HUB_OFFLINE=1 and the Hub cache does not hold it)"
            if constants.HF_HUB_OFFLINE
            else f"neither a local directory nor reachable on the Hub ({e})"
        )
        raise FileNotFoundError(f"{repo_id}: {why}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise FileNotFoundError(
            f"{repo_id}: neither a local directory nor a Hub repo holding {IMPORTANCE_WEIGHTS} "
            f"({type(e).__name__}: {e})"
        ) from None
