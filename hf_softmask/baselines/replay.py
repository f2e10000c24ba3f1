"""Experience replay for continual pre-training: a fixed share of every training batch comes from earlier text.

:class:`ReplayMixture` is a map-style dataset laid out batch by batch. Row ``j`` belongs to batch ``g = j // B``
at slot ``s = j % B`` (``B`` = per-device batch size): slots ``s < B - r`` hold rows of the current domain, the
last ``r = floor(R * B + 0.5)`` slots hold replay rows. Read in order (the Trainer's ``train_sampling_strategy=
"sequential"``, see :func:`replay_training_overrides`), every micro-batch the model sees therefore has exactly
``B - r`` domain rows and ``r`` replay rows:

- gradient accumulation: each micro-batch is one such batch;
- several processes: accelerate hands whole batches to the ranks in turn (batch ``g`` to rank ``g % world``),
  so every rank's batch mixes at the ratio;
- resume: the dataset has no state; row ``j`` is a pure function of ``(seed, j)``, and the Trainer skips the
  batches it already trained on.

Which rows fill the slots (all drawn without replacement within a pass, a new seeded shuffle per pass):

- domain slot ``d = g * (B - r) + s`` takes row ``perm(seed, "domain", d // N)[d % N]`` of the ``N`` domain rows;
- replay slot ``t = g * r + (s - (B - r))`` takes source ``k = t % K`` of the ``K`` replay sources (earlier
  domains in order, then general text), so the ``r`` replay rows of a batch are spread over the sources in turn
  (each source gets ``r // K`` or ``r // K + 1`` of them, exactly ``r / K`` when ``K`` divides ``r``);
  within source ``k`` it is that source's ``u = t // K``-th draw: row ``perm(seed, k, u // N_k)[u % N_k]``.

``R = 0`` (or no source) is the plain domain stream: :func:`replay_dataset` returns the domain dataset itself
and the Trainer keeps its own random sampler. ``R`` with ``r = B`` (``R = 1``) or ``r = 0`` for ``R > 0`` is
refused: the first leaves no domain text, the second would silently replay nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["ReplayMixture", "replay_dataset", "replay_rows_per_batch", "replay_sources", "replay_training_overrides"]


def replay_rows_per_batch(ratio: float, batch_size: int) -> int:
    """``r = floor(ratio * batch_size + 0.5)``: replay rows in every batch (halves round up); checks both ends."""
    if not 0 <= ratio < 1:
        raise ValueError(f"replay_ratio must lie in [0, 1), got {ratio}: at 1 no batch would hold current-domain text")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    r = math.floor(ratio * batch_size + 0.5)
    if ratio > 0 and r == 0:
        raise ValueError(
            f"replay_ratio {ratio} of a batch of {batch_size} rounds to 0 replay rows; raise "
            f"replay_ratio to >= {0.5 / batch_size:g} or per_device_train_batch_size"
        )
    if r >= batch_size:
        raise ValueError(
            f"replay_ratio {ratio} of a batch of {batch_size} rounds to {r} replay rows, leaving no "
            "current-domain row; lower replay_ratio or raise per_device_train_batch_size"
        )
    return r


def _permutation(n: int, seed: int, stream: int, cycle: int) -> torch.Tensor:
    # One generator per (seed, stream, pass): any row can be computed without replaying earlier draws.
    g = torch.Generator().manual_seed((seed * 1_000_003 + (stream + 1) * 7_919 + cycle) % 2**63)
    return torch.randperm(n, generator=g)


class ReplayMixture(Dataset):
    """``num_batches`` batches of ``batch_size`` rows, the last ``replay_rows`` of each from ``sources``.

    Args:
        domain: the current domain's training rows (any map-style dataset, e.g. from
            :func:`hf_softmask.data.build_lm_dataset`).
        sources: replay datasets (earlier domains, general text), with the same row keys as ``domain``.
        batch_size: the per-device training batch size ``B`` (must equal the Trainer's).
        replay_rows: ``r`` (:func:`replay_rows_per_batch`), ``1 <= r < B``.
        num_batches: batches in the dataset; default one pass over the domain rows, ``ceil(N / (B - r))``. For a
            run of ``max_steps`` optimizer steps give ``max_steps * gradient_accumulation_steps * world_size``
            so that no batch repeats.
        seed: seed of all shuffles (the run's seed).
        source_names: labels of ``sources`` (for :meth:`source_of`, logs and tests).
    """

    def __init__(
        self,
        domain,
        sources: Sequence,
        batch_size: int,
        replay_rows: int,
        num_batches: int | None = None,
        seed: int = 0,
        source_names: Sequence[str] | None = None,
    ):
        if not sources:
            raise ValueError("ReplayMixture needs at least one replay source; use the domain dataset itself otherwise")
        if not 1 <= replay_rows < batch_size:
            raise ValueError(f"replay_rows must satisfy 1 <= r < batch_size={batch_size}, got {replay_rows}")
        for name, ds in [("domain", domain)] + list(zip(source_names or range(len(sources)), sources)):
            if len(ds) == 0:
                raise ValueError(f"replay: dataset {name!r} is empty")
        keys = set(domain[0])
        for i, ds in enumerate(sources):
            if set(ds[0]) != keys:
                raise ValueError(f"replay source {i} has row keys {sorted(ds[0])}, the domain has {sorted(keys)}")
        self.domain, self.sources = domain, list(sources)
        self.batch_size, self.replay_rows, self.seed = batch_size, replay_rows, seed
        self.domain_rows = batch_size - replay_rows
        self.num_batches = num_batches if num_batches is not None else math.ceil(len(domain) / self.domain_rows)
        if self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {self.num_batches}")
        self.source_names = (
            list(source_names) if source_names is not None else [f"source{i}" for i in range(len(sources))]
        )
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # stream -> (pass, its permutation): the current one

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def _row(self, stream: int, dataset, draw: int) -> int:
        n = len(dataset)
        cycle = draw // n
        cached = self._perms.get(stream)
        if cached is None or cached[0] != cycle:
            cached = self._perms[stream] = (cycle, _permutation(n, self.seed, stream, cycle))
        return int(cached[1][draw % n])

    def locate(self, j: int) -> tuple[int, int]:
        """``(source, row)`` of mixture row ``j``: source -1 is the domain, k >= 0 is ``sources[k]``."""
        if not 0 <= j < len(self):
            raise IndexError(j)
        g, s = divmod(j, self.batch_size)
        if s < self.domain_rows:
            return -1, self._row(-1, self.domain, g * self.domain_rows + s)
        t = g * self.replay_rows + s - self.domain_rows
        k, u = t % len(self.sources), t // len(self.sources)
        return k, self._row(k, self.sources[k], u)

    def source_of(self, j: int) -> str:
        k, _ = self.locate(j)
        return "domain" if k < 0 else self.source_names[k]

    def __getitem__(self, j: int) -> dict:
        k, row = self.locate(j)
        return (self.domain if k < 0 else self.sources[k])[row]


def replay_sources(
    train_sets: Sequence,
    domain_index: int,
    general=None,
    replay_general: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[list, list[str]]:
    """The replay sources of domain ``domain_index``: the training sets of the domains before it, then general text.

    Returns ``(datasets, names)``. ``replay_general`` without a ``general`` dataset is refused.
    """
    names = list(names) if names is not None else [f"domain{i}" for i in range(len(train_sets))]
    sources, labels = list(train_sets[:domain_index]), names[:domain_index]
    if replay_general:
        if general is None:
            raise ValueError("replay_general is set but no general-text training set was given")
        sources.append(general)
        labels.append("general")
    return sources, labels


def replay_dataset(
    domain,
    sources: Sequence,
    ratio: float,
    batch_size: int,
    *,
    num_batches: int | None = None,
    seed: int = 0,
    source_names: Sequence[str] | None = None,
):
    """The training dataset of one domain under replay ratio ``ratio``: the domain dataset itself when there is
    nothing to replay (``ratio == 0`` or no source, e.g. the first domain without general text), else a
    :class:`ReplayMixture`. Pair it with :func:`replay_training_overrides`."""
    r = replay_rows_per_batch(ratio, batch_size)
    if r == 0 or not sources:
        return domain
    return ReplayMixture(domain, sources, batch_size, r, num_batches=num_batches, seed=seed, source_names=source_names)


def replay_training_overrides(dataset, args=None) -> dict:
    """TrainingArguments fields the Trainer needs to read ``dataset`` batch by batch (``{}`` for a plain dataset).

    With ``args`` (a TrainingArguments), also checks that its per-device batch size is the mixture's.
    """
    if not isinstance(dataset, ReplayMixture):
        return {}
    if args is not None and args.per_device_train_batch_size != dataset.batch_size:
        raise ValueError(
            f"the replay mixture is laid out in batches of {dataset.batch_size} but "
            f"per_device_train_batch_size is {args.per_device_train_batch_size}; "
            "build it with the same size"
        )
    # dataloader_drop_last=False: the length is a whole number of batches, so nothing is dropped or split.
    return {"train_sampling_strategy": "sequential", "dataloader_drop_last": False}
