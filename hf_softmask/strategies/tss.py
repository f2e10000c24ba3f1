"""TSS: task-specific subnetworks of a frozen pretrained model, trained under a soft mask of earlier tasks' importance.

Per task ``t`` (docs/algorithms.md §5): the scored layers use ``W ⊙ 1[s ≥ τ]``; only the scores (and task ``t``'s head)
train. After the task, the importance of each score is ``|tanh(z)|`` of ``|d loss / d alpha|`` (virtual alpha on
``W ⊙ mask``; weights outside the task's mask get 0, see ``zero_unused_importance``), accumulated by elementwise max;
the mask is stored bit-packed; the next task continues from the same scores with their updates (``mode="update"``,
default) or gradients (``mode="grad"``) scaled by ``1 - I_acc``. Earlier tasks keep their stored masks and heads, so
their outputs are exactly unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..core.compatibility import check_strategy_supported
from ..core.importance_compute import move_batch
from ..core.masking import MODES, GradMaskHooks
from ..core.optim import install_update_masks
from ..tss import SubnetworkConfig, SubnetworkModel, get_subnetwork_model
from ..utils.io import atomic_write_json
from .base import STRATEGY_STATE_CONFIG, ContinualStrategy
from .units import StrategyConfig

__all__ = [
    "SubnetworkSettings",
    "SubnetworkStrategy",
    "TSSConfig",
    "TSSStrategy",
    "adapter_config_field",
    "adapter_field",
    "subnetwork_backbone",
]


def subnetwork_backbone(model: nn.Module) -> SubnetworkModel:
    """The :class:`SubnetworkModel` of ``model`` (itself, or its ``backbone``)."""
    if isinstance(model, SubnetworkModel):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, SubnetworkModel):
        return backbone
    raise TypeError(
        "this strategy needs a model whose .backbone is a SubnetworkModel; call strategy.prepare_model(model) first"
    )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def adapter_field(name: str, default):
    """A strategy-config field that sets ``SubnetworkConfig.<name>``: the adapter field's help and choices, the
    strategy's own default."""
    meta = SubnetworkConfig.__dataclass_fields__[name].metadata
    return field(default=default, metadata={**meta, "help": f"{meta['help']} Sets adapter_config.{name}."})


def adapter_config_field():
    """The ``adapter_config`` field of a subnetwork strategy's config."""
    return field(
        default=None,
        metadata={
            "help": "A whole SubnetworkConfig (or its dict, as saved in strategy_config.json) for adapter settings "
            "the other fields do not cover (exclude_modules, layers_to_transform, ...). The fields that set "
            "adapter_config.<name> must then keep their defaults or agree with it; after construction they "
            "mirror it."
        },
    )


def _comparable(value):
    return sorted(value) if isinstance(value, (set, frozenset, list, tuple)) else value


class SubnetworkSettings:
    """Mixin of :class:`TSSConfig` and ``WSNConfig``: resolves ``adapter_config`` from the fields that set it.

    ``ADAPTER_FIELDS`` names the config's fields that set the :class:`SubnetworkConfig` field of the same name;
    ``ADAPTER_FIXED`` the adapter settings the method needs. After ``resolve_adapter()`` ``adapter_config`` is a
    :class:`SubnetworkConfig` and the shortcut fields hold its values: one adapter, described once.
    """

    ADAPTER_FIELDS: ClassVar[tuple[str, ...]] = ()
    ADAPTER_FIXED: ClassVar[dict[str, object]] = {}

    def resolve_adapter(self) -> None:
        shortcuts = {name: getattr(self, name) for name in self.ADAPTER_FIELDS}
        if self.adapter_config is None:
            self.adapter_config = SubnetworkConfig(**self.ADAPTER_FIXED, **shortcuts)
        else:
            adapter = self.adapter_config
            if isinstance(adapter, dict):
                adapter = SubnetworkConfig(**adapter)
            if not isinstance(adapter, SubnetworkConfig):
                raise TypeError(
                    f"{type(self).__name__}.adapter_config must be a SubnetworkConfig or its dict, "
                    f"got {type(adapter).__name__}"
                )
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            clash = [
                name
                for name, value in shortcuts.items()
                if _comparable(value) != _comparable(defaults[name])
                and _comparable(value) != _comparable(getattr(adapter, name))
            ]
            if clash:
                raise ValueError(
                    f"{type(self).__name__}: {clash} set both as keywords and (differently) in "
                    "adapter_config; set each in one place"
                )
            self.adapter_config = adapter
        wrong = {
            k: getattr(self.adapter_config, k)
            for k, v in self.ADAPTER_FIXED.items()
            if getattr(self.adapter_config, k) != v
        }
        if wrong:
            raise ValueError(
                f"{type(self).__name__} needs SubnetworkConfig with "
                f"{', '.join(f'{k}={v!r}' for k, v in self.ADAPTER_FIXED.items())}; adapter_config has "
                f"{', '.join(f'{k}={v!r}' for k, v in wrong.items())}"
            )
        for name in self.ADAPTER_FIELDS:
            setattr(self, name, _comparable(getattr(self.adapter_config, name)))


@dataclass
class TSSConfig(SubnetworkSettings, StrategyConfig):
    """Settings of :class:`TSSStrategy` (each may be passed as a keyword)."""

    ADAPTER_FIELDS: ClassVar[tuple[str, ...]] = ("threshold", "init_score", "score_init", "target_modules")
    ADAPTER_FIXED: ClassVar[dict[str, object]] = {"selection": "threshold"}

    mode: str = field(
        default="update",
        metadata={
            "help": "'update': scale each score's optimizer update by 1 - I_acc (exact under AdamW); "
            "'grad': scale its gradient.",
            "choices": list(MODES),
        },
    )
    threshold: float = adapter_field("threshold", 0.0)
    init_score: float = adapter_field("init_score", 0.02)
    score_init: str = adapter_field("score_init", "magnitude")
    target_modules: list[str] | str | None = adapter_field("target_modules", None)
    importance_batches: int | None = field(
        default=None,
        metadata={"help": "Cap on the batches of each task's score-importance estimate (None: the whole dataloader)."},
    )
    adapter_config: SubnetworkConfig | dict | None = adapter_config_field()
    zero_unused_importance: bool = field(
        default=True,
        metadata={
            "help": "Weights outside a task's subnetwork get importance 0 "
            "(docs/strategies_validation.md has the measurement)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.importance_batches is not None and self.importance_batches < 1:
            raise ValueError(f"importance_batches must be >= 1, got {self.importance_batches}")
        self.resolve_adapter()


class SubnetworkStrategy(ContinualStrategy):
    """Shared machinery of TSS and WSN: wrap the backbone, select the task, store each finished task's mask."""

    runners = ("finetune",)

    def __init__(self, config=None, **settings):
        super().__init__(config, **settings)
        self.task_id = 0
        self.storage_bytes: dict[int, int] = {}
        self.mask_density: dict[int, float] = {}

    @property
    def adapter_config(self) -> SubnetworkConfig:
        """The adapter's settings (``cfg.adapter_config``)."""
        return self.cfg.adapter_config

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Replace ``model.backbone`` by a :class:`SubnetworkModel` over it (everything but the scores frozen)."""
        if not hasattr(model, "backbone"):
            raise TypeError(
                f"{self.name} expects a MultiTaskClassifier-like model with a .backbone, got {type(model).__name__}"
            )
        if not isinstance(model.backbone, SubnetworkModel):
            # Before the Trainer (whose train begin checks the rest): a PEFT backbone fails while being wrapped.
            check_strategy_supported(self, model=model.backbone)
            model.backbone = get_subnetwork_model(model.backbone, self.adapter_config)
        return model

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.task_id = task_id
        subnetwork_backbone(model).set_task(task_id)

    def finish(self, model: nn.Module, task_id: int) -> None:
        tuner = subnetwork_backbone(model)
        self.storage_bytes[task_id] = tuner.finish_task(task_id)
        self.mask_density[task_id] = tuner.mask_density(task_id)

    def config(self) -> dict:
        return {
            **super().config(),
            "storage_bytes": {str(k): v for k, v in self.storage_bytes.items()},
            "mask_density": {str(k): v for k, v in self.mask_density.items()},
        }

    def save_model(self, model: nn.Module, directory: str | os.PathLike) -> None:
        """Write the subnetwork adapter (every finished task) and this strategy's config into ``directory``."""
        subnetwork_backbone(model).save_pretrained(directory)
        atomic_write_json(Path(directory) / STRATEGY_STATE_CONFIG, self.config())


class TSSStrategy(SubnetworkStrategy):
    """Task-specific subnetworks with soft-masked scores (TSS)."""

    name = "tss"
    changes_effective_lr = True
    config_class = TSSConfig

    def __init__(self, config: TSSConfig | None = None, **settings):
        super().__init__(config, **settings)
        self._handle = None
        self._hooks = None

    def soft_masks(self, model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
        """``1 - I_acc`` per score tensor (empty before any task finished)."""
        tuner = subnetwork_backbone(model)
        if not tuner.finished_tasks():
            return {}
        scores = tuner.score_parameters()
        return {
            scores[name]: (1.0 - imp).to(scores[name].device, scores[name].dtype)
            for name, imp in tuner.importance().items()
        }

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        masks = self.soft_masks(model)
        if not masks:
            return
        if self.cfg.mode == "grad":
            self._hooks = GradMaskHooks(masks)
        else:
            if optimizer is None:
                raise ValueError("update-mode soft masking needs the optimizer at on_train_begin")
            self._handle = install_update_masks(optimizer, masks)

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        if dataloader is None:
            raise ValueError("TSS needs the task's training dataloader in after_task to compute score importance")
        tuner = subnetwork_backbone(model)
        device = _model_device(model)
        was_training = model.training
        model.eval()
        try:

            def loss_fn(batch):
                return model(**move_batch(batch, device)).loss

            importance = tuner.compute_score_importance(
                loss_fn,
                dataloader,
                max_batches=self.cfg.importance_batches,
                desc=f"TSS importance (task {task_id})",
                zero_unused=self.cfg.zero_unused_importance,
            )
        finally:
            model.train(was_training)
        tuner.accumulate_importance(importance)
        self.finish(model, task_id)
