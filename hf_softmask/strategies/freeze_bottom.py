"""Freeze the bottom layers: the first ``k`` transformer blocks (and, optionally, the embeddings) do not train.

``before_task`` sets ``requires_grad=False`` on every parameter of blocks ``0 .. k-1`` of the registry's layer list
(:class:`hf_softmask.core.architectures.ArchitectureSpec` ``layers``) and, with ``freeze_embeddings``, of every
``nn.Embedding`` of the base model outside the blocks (token, position, token-type embeddings). The Trainer builds
its optimizer from the parameters that require grad, so frozen ones get neither updates nor weight decay: they
stay bit-identical. With tied input/output embeddings (GPT-2, SmolLM2) the LM head is the same tensor and is
frozen with them. ``after_task`` restores every flag, so the model leaves the strategy as it came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.architectures import get_architecture
from .base import ContinualStrategy
from .units import StrategyConfig, unit_model

__all__ = ["FreezeBottomConfig", "FreezeBottomStrategy", "bottom_parameters"]


@dataclass
class FreezeBottomConfig(StrategyConfig):
    """Settings of :class:`FreezeBottomStrategy` (each may be passed as a keyword)."""

    num_frozen_layers: int = field(
        default=1, metadata={"help": "k: the bottom k transformer blocks are frozen (0 .. number of layers)."}
    )
    freeze_embeddings: bool = field(
        default=True,
        metadata={"help": "Also freeze the embeddings (token, position, token-type; a tied LM head with them)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_frozen_layers < 0:
            raise ValueError(f"num_frozen_layers must be >= 0, got {self.num_frozen_layers}")
        if self.num_frozen_layers == 0 and not self.freeze_embeddings:
            raise ValueError(
                "freeze_bottom with num_frozen_layers=0 and freeze_embeddings=False freezes nothing; "
                "use strategy 'ncl' for plain training, or set num_frozen_layers >= 1"
            )


def bottom_parameters(model: nn.Module, num_layers: int, embeddings: bool) -> dict[str, nn.Parameter]:
    """The parameters of the bottom ``num_layers`` blocks (and embeddings), named as in ``named_parameters()``."""
    inner = unit_model(model)
    base = getattr(inner, "base_model", inner)
    layers = base.get_submodule(get_architecture(inner.config.model_type).layers)
    if num_layers > len(layers):
        raise ValueError(
            f"freeze_bottom: num_frozen_layers={num_layers} but the model has {len(layers)} layers; "
            f"give a value from 0 to {len(layers)}"
        )
    modules = list(layers[:num_layers])
    if embeddings:
        in_blocks = {id(m) for block in layers for m in block.modules()}
        modules += [m for m in base.modules() if isinstance(m, nn.Embedding) and id(m) not in in_blocks]
    chosen = {id(p) for m in modules for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in chosen}


class FreezeBottomStrategy(ContinualStrategy):
    """Trains only what lies above the bottom ``k`` blocks (see the module docstring)."""

    name = "freeze_bottom"
    runners = ("pretrain",)
    #: frozen units have an effective learning rate of 0: compare it against the ncl learning-rate frontier
    changes_effective_lr = True
    config_class = FreezeBottomConfig

    def __init__(self, config: FreezeBottomConfig | None = None, **settings):
        super().__init__(config, **settings)
        self.task_id = -1
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        bottom_parameters(model, self.cfg.num_frozen_layers, self.cfg.freeze_embeddings)  # refuse a bad k at start
        return model

    def frozen_names(self, model: nn.Module) -> list[str]:
        return list(bottom_parameters(model, self.cfg.num_frozen_layers, self.cfg.freeze_embeddings))

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.task_id = task_id
        frozen = bottom_parameters(model, self.cfg.num_frozen_layers, self.cfg.freeze_embeddings)
        self._flags = [(p, p.requires_grad) for p in frozen.values()]
        for p in frozen.values():
            p.requires_grad_(False)

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._flags = []

    def config(self) -> dict:
        return super().config()
