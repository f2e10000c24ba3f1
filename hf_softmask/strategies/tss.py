"""TSS: task-specific subnetworks of a frozen pretrained model, trained under a soft mask of earlier tasks' importance.

Per task ``t`` (ALGORITHMS.md §5): the scored layers use ``W ⊙ 1[s ≥ τ]``; only the scores (and task ``t``'s head)
train. After the task, the importance of each score is ``|tanh(z)|`` of ``|d loss / d alpha|`` (virtual alpha on
``W ⊙ mask``; weights outside the task's mask get 0, see ``zero_unused_importance``), accumulated by elementwise max;
the mask is stored bit-packed; the next task continues from the same scores with their updates (``mode="update"``,
default) or gradients (``mode="grad"``) scaled by ``1 - I_acc``. Earlier tasks keep their stored masks and heads, so
their outputs are exactly unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..estimators import move_batch
from ..io import atomic_write_json
from ..masking import MODES, GradMaskHooks
from ..optim import install_update_masks
from ..tss import SubnetworkConfig, SubnetworkModel, get_subnetwork_model
from .base import STRATEGY_STATE_CONFIG, ContinualStrategy

__all__ = ["SubnetworkStrategy", "TSSStrategy", "subnetwork_backbone"]


def subnetwork_backbone(model: nn.Module) -> SubnetworkModel:
    """The :class:`SubnetworkModel` of ``model`` (itself, or its ``backbone``)."""
    if isinstance(model, SubnetworkModel):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, SubnetworkModel):
        return backbone
    raise TypeError("this strategy needs a model whose .backbone is a SubnetworkModel; call strategy.prepare_model(model) first")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class SubnetworkStrategy(ContinualStrategy):
    """Shared machinery of TSS and WSN: wrap the backbone, select the task, store each finished task's mask."""

    settings = ("finetune",)

    def __init__(self, adapter_config: SubnetworkConfig):
        self.adapter_config = adapter_config
        self.task_id = 0
        self.storage_bytes: dict[int, int] = {}
        self.mask_density: dict[int, float] = {}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Replace ``model.backbone`` by a :class:`SubnetworkModel` over it (everything but the scores frozen)."""
        if not hasattr(model, "backbone"):
            raise TypeError(f"{self.name} expects a MultiTaskClassifier-like model with a .backbone, got {type(model).__name__}")
        if not isinstance(model.backbone, SubnetworkModel):
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
        return {"name": self.name, "adapter_config": self.adapter_config.to_dict(),
                "storage_bytes": {str(k): v for k, v in self.storage_bytes.items()},
                "mask_density": {str(k): v for k, v in self.mask_density.items()}}

    def save_model(self, model: nn.Module, directory: str | os.PathLike) -> None:
        """Write the subnetwork adapter (every finished task) and this strategy's config into ``directory``."""
        subnetwork_backbone(model).save_pretrained(directory)
        atomic_write_json(Path(directory) / STRATEGY_STATE_CONFIG, self.config())


class TSSStrategy(SubnetworkStrategy):
    """Task-specific subnetworks with soft-masked scores (TSS)."""

    name = "tss"
    changes_effective_lr = True

    def __init__(self, mode: str = "update", threshold: float = 0.0, init_score: float = 0.02, score_init: str = "magnitude",
                 target_modules=None, importance_batches: int | None = None,
                 adapter_config: SubnetworkConfig | dict | None = None, zero_unused_importance: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if adapter_config is None:
            adapter_config = SubnetworkConfig(target_modules=target_modules, selection="threshold", threshold=threshold,
                                              init_score=init_score, score_init=score_init)
        elif isinstance(adapter_config, dict):
            adapter_config = SubnetworkConfig(**adapter_config)
        super().__init__(adapter_config)
        self.mode = mode
        self.importance_batches = importance_batches
        #: weights outside a task's subnetwork get importance 0 (docs/strategies.md has the measurement)
        self.zero_unused_importance = zero_unused_importance
        self._handle = None
        self._hooks = None

    def soft_masks(self, model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
        """``1 - I_acc`` per score tensor (empty before any task finished)."""
        tuner = subnetwork_backbone(model)
        if not tuner.finished_tasks():
            return {}
        scores = tuner.score_parameters()
        return {scores[name]: (1.0 - imp).to(scores[name].device, scores[name].dtype) for name, imp in tuner.importance().items()}

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        masks = self.soft_masks(model)
        if not masks:
            return
        if self.mode == "grad":
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

            importance = tuner.compute_score_importance(loss_fn, dataloader, max_batches=self.importance_batches,
                                                        desc=f"TSS importance (task {task_id})",
                                                        zero_unused=self.zero_unused_importance)
        finally:
            model.train(was_training)
        tuner.accumulate_importance(importance)
        self.finish(model, task_id)

    def config(self) -> dict:
        return {**super().config(), "mode": self.mode, "importance_batches": self.importance_batches,
                "zero_unused_importance": self.zero_unused_importance}
