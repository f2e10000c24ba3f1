"""WSN (winning subnetworks): per task, the top-c% scored weights of each layer; weights an earlier task uses never
move.

Reuses the TSS scored layers (:mod:`hf_softmask.tss`) with ``selection="topk"`` and trainable base weights
(docs/algorithms.md §6). The update of each scored weight is multiplied by ``1 - used``, ``used`` = union of the
finished tasks' masks, so a weight some earlier task relies on neither moves nor decays; each finished task's
mask is stored bit-packed. Biases, norms and embeddings of the backbone stay frozen. WSN keeps no importance
tensor (the scored layers allocate one only for TSS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.optim import install_update_masks
from ..tss import SubnetworkConfig
from .tss import SubnetworkSettings, SubnetworkStrategy, adapter_config_field, adapter_field, subnetwork_backbone
from .units import StrategyConfig

__all__ = ["WSNConfig", "WSNStrategy"]


@dataclass
class WSNConfig(SubnetworkSettings, StrategyConfig):
    """Settings of :class:`WSNStrategy` (each may be passed as a keyword)."""

    ADAPTER_FIELDS: ClassVar[tuple[str, ...]] = ("keep_ratio", "init_score", "score_init", "target_modules")
    ADAPTER_FIXED: ClassVar[dict[str, object]] = {"selection": "topk", "train_base_weights": True}

    keep_ratio: float = adapter_field("keep_ratio", 0.5)
    init_score: float = adapter_field("init_score", 1.0)
    score_init: str = adapter_field("score_init", "magnitude")
    target_modules: list[str] | str | None = adapter_field("target_modules", None)
    adapter_config: SubnetworkConfig | dict | None = adapter_config_field()

    def __post_init__(self):
        super().__post_init__()
        self.resolve_adapter()


class WSNStrategy(SubnetworkStrategy):
    """Winning SubNetworks: top-``keep_ratio`` weights per layer per task, earlier tasks' weights frozen."""

    name = "wsn"
    config_class = WSNConfig

    def __init__(self, config: WSNConfig | None = None, **settings):
        super().__init__(config, **settings)
        self._handle = None

    def update_masks(self, model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
        """Bool ``not used`` per scored weight (empty before any task finished): 1 byte per weight while a task
        trains, never a copy in the weight's dtype."""
        tuner = subnetwork_backbone(model)
        if not tuner.finished_tasks():
            return {}
        a = tuner.adapter_name
        return {layer.get_base_layer().weight: ~layer.used_mask(a) for layer in tuner.subnetwork_layers().values()}

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        masks = self.update_masks(model)
        if masks:
            if optimizer is None:
                raise ValueError("WSN needs the optimizer at on_train_begin to freeze earlier tasks' weights")
            self._handle = install_update_masks(optimizer, masks)

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.finish(model, task_id)
