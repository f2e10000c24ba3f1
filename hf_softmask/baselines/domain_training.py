"""Strategy-independent options of each domain's training: replay, WiSE-FT merging, weight EMA.

They change only the data a domain trains on and the weights before/after it, so they combine with every
strategy (DAS + replay, LoRA + merging, ...). A runner holds one :class:`DomainTraining` and calls, per domain ``k``::

    extras.before_domain(model)                                   # WiSE-FT snapshot, before the strategy's hooks
    strategy.before_task(model, k, loader)
    train_set = extras.train_dataset(k, train_sets, general_train, batch_size=B, seed=seed,
                                     num_batches=max_steps * grad_accum * world_size, names=domain_names)
    args = TrainingArguments(..., **extras.training_overrides(train_set))
    trainer = StrategyTrainer(..., train_dataset=train_set, callbacks=[*callbacks, *extras.callbacks()])
    trainer.train(resume_from_checkpoint=...)                       # the EMA (if any) is swapped in at the end
    strategy.after_task(model, k, loader)                          # e.g. LoRA merges its adapter here
    extras.after_domain(model)                                     # WiSE-FT: A * new + (1 - A) * before

The strategy's own loaders (importance, Fisher) stay on the domain's text; only the Trainer's data is mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .merging import WeightEMA, interpolate_weights_, snapshot_weights
from .replay import replay_dataset, replay_sources, replay_training_overrides

__all__ = ["DomainTraining", "DomainTrainingOptions"]


@dataclass
class DomainTrainingOptions:
    """Runner flags of the strategy-independent baselines (defaults: all off)."""

    replay_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Fraction R of every training batch drawn from earlier domains' training text "
            "(floor(R*B + 0.5) rows of a batch of B); 0: off."
        },
    )
    replay_general: bool = field(
        default=False,
        metadata={"help": "Also replay general text (one more replay source, from the first domain on)."},
    )
    merge_alpha: float = field(
        default=1.0,
        metadata={"help": "WiSE-FT: after each domain the weights become A*new + (1-A)*before the domain; 1: off."},
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Decay d of an EMA of the weights during each domain, swapped in at its end "
            "(e <- d*e + (1-d)*theta after every optimizer step); 0: off."
        },
    )
    merge_snapshot_device: str | None = field(
        default=None,
        metadata={
            "help": "Where the WiSE-FT snapshot lives: 'cpu' saves accelerator memory; default beside each parameter."
        },
    )

    def __post_init__(self):
        if not 0 <= self.replay_ratio < 1:
            raise ValueError(f"replay_ratio must lie in [0, 1), got {self.replay_ratio}")
        if self.replay_general and self.replay_ratio == 0:
            raise ValueError("replay_general needs replay_ratio > 0 (the share of each batch that is replayed)")
        if not 0 <= self.merge_alpha <= 1:
            raise ValueError(f"merge_alpha must lie in [0, 1], got {self.merge_alpha}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1) (0: off), got {self.ema_decay}")


class DomainTraining:
    """Applies :class:`DomainTrainingOptions` around each domain (see the module docstring for the call sites)."""

    def __init__(self, options: DomainTrainingOptions | None = None, **kwargs):
        if options is not None and kwargs:
            raise TypeError("pass either options= or keyword settings, not both")
        self.options = options or DomainTrainingOptions(**kwargs)
        self._before: dict | None = None

    def before_domain(self, model: nn.Module) -> None:
        """Snapshot the weights for WiSE-FT (nothing when ``merge_alpha == 1``)."""
        o = self.options
        self._before = snapshot_weights(model, device=o.merge_snapshot_device) if o.merge_alpha < 1 else None

    def train_dataset(
        self,
        domain_index: int,
        train_sets: Sequence,
        general_train=None,
        *,
        batch_size: int,
        seed: int,
        num_batches: int | None = None,
        names: Sequence[str] | None = None,
    ):
        """Domain ``domain_index``'s training set, mixed with replay (the plain domain set when replay is off)."""
        o = self.options
        domain = train_sets[domain_index]
        if o.replay_ratio == 0:
            return domain
        sources, labels = replay_sources(train_sets, domain_index, general_train, o.replay_general, names)
        return replay_dataset(
            domain, sources, o.replay_ratio, batch_size, num_batches=num_batches, seed=seed, source_names=labels
        )

    @staticmethod
    def training_overrides(train_set) -> dict:
        """TrainingArguments fields for ``train_set`` (sequential reading of a replay mixture; else none)."""
        return replay_training_overrides(train_set)

    def callbacks(self) -> list:
        """Fresh Trainer callbacks for one domain (the weight EMA when ``ema_decay > 0``)."""
        return [WeightEMA(self.options.ema_decay)] if self.options.ema_decay > 0 else []

    def after_domain(self, model: nn.Module) -> int:
        """WiSE-FT interpolation with the snapshot of :meth:`before_domain`; returns the parameters changed."""
        if self.options.merge_alpha == 1:
            return 0
        if self._before is None:
            raise RuntimeError("merge_alpha < 1: call before_domain(model) before training the domain")
        changed = interpolate_weights_(model, self._before, self.options.merge_alpha)
        self._before = None
        return changed
