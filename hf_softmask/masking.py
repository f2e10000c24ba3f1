"""From unit importance to per-parameter soft masks, applied to gradients or to updates."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .importance import UnitImportance
from .layout import UNOWNED_CATEGORIES, UnitLayout
from .optim import _is_dtensor, _local, _LocalMasks, _unwrap, install_update_masks
from .peft_support import check_adapters_reach_units

__all__ = ["SoftMaskConfig", "build_param_masks", "GradMaskHooks", "ShardedGradMask", "SoftMasker", "POLICIES", "MODES"]

POLICIES = ("train", "freeze", "mean")
MODES = ("update", "grad")


@dataclass
class SoftMaskConfig:
    """How importance turns into masks. Every field is also a ``SoftMaskTrainingArguments`` flag."""

    mode: str = field(default="update", metadata={"help": "'update': scale the optimizer's whole change of each owned slice by 1-I "
                                                    "(holds under Adam/AdamW, weight decay included). 'grad': scale gradients "
                                                    "(the DAS paper; Adam largely cancels it)."})
    embeddings: str = field(default="train", metadata={"help": "Policy for embeddings: train | freeze | mean (mask by the mean unit mask)."})
    norms: str = field(default="train", metadata={"help": "Policy for LayerNorm/RMSNorm: train | freeze | mean (mask by the mean mask of the norm's layer)."})
    task_head: str = field(default="train", metadata={"help": "Policy for parameters outside the base model (LM head, classifier): train | freeze | mean."})
    other: str = field(default="train", metadata={"help": "Policy for other unowned parameters (output-projection biases, pooler): train | freeze | mean."})
    mask_power: float = field(default=1.0, metadata={"help": "Mask = 1 - I**p. p>1 protects only the most important units; p<1 protects more broadly."})
    compile_update: bool = field(default=False, metadata={"help": "Update mode with Adam/AdamW: run the masked update through torch.compile, "
                                                          "one fused pass per tensor (as fast as torch's fused AdamW); the first step compiles."})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for cat in UNOWNED_CATEGORIES:
            if getattr(self, cat) not in POLICIES:
                raise ValueError(f"{cat} policy must be one of {POLICIES}, got {getattr(self, cat)!r}")
        if not self.mask_power > 0:
            raise ValueError(f"mask_power must be > 0, got {self.mask_power}")


_LAYER_RE = re.compile(r"\.(\d+)\.")


def build_param_masks(layout: UnitLayout, importance: UnitImportance, config: SoftMaskConfig | None = None) -> dict[nn.Parameter, torch.Tensor]:
    """Masks keyed by parameter, each broadcastable to it: ``1 - I**p`` on owned slices, policies elsewhere.

    Parameters with policy "train" get no entry (they are not masked at all).
    """
    config = config or SoftMaskConfig()
    importance.validate_for(layout)
    imp_h = importance.heads ** config.mask_power
    imp_f = importance.ffn ** config.mask_power
    masks: dict[nn.Parameter, torch.Tensor] = {}
    for s in layout.owned:
        unit_mask = 1.0 - layout.unit_values(s.kind, s.layer, imp_h, imp_f)
        masks[s.param] = unit_mask[s.index].view(s.broadcast_shape())

    layer_mean = torch.cat([1 - imp_h, 1 - imp_f], dim=1).mean(1)
    global_mean = float(layer_mean.mean())
    for cat, params in layout.unowned_parameters().items():
        policy = getattr(config, cat)
        for name, p in params:
            if policy == "freeze":
                masks[p] = torch.zeros(())
            elif policy == "mean":
                m = _LAYER_RE.search(name)
                value = float(layer_mean[int(m.group(1))]) if (m and cat == "norms" and int(m.group(1)) < layout.num_layers) else global_mean
                masks[p] = torch.tensor(value)
    return {p: m.to(device=p.device, dtype=p.dtype) for p, m in masks.items()}


class GradMaskHooks:
    """Multiplies each parameter's incoming gradient by its mask (tensor hooks).

    The hook fires on every backward, before the gradient is accumulated into ``.grad``: with
    gradient accumulation the optimizer sees ``m * sum(g)`` (not ``m**k``), and clipping, run later,
    sees masked gradients.
    """

    def __init__(self, masks: dict[nn.Parameter, torch.Tensor]):
        self.masks = masks
        self._handles = [p.register_hook(self._hook(m)) for p, m in masks.items() if p.requires_grad]

    @staticmethod
    def _hook(m: torch.Tensor):
        return lambda g: g * m

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ShardedGradMask:
    """Grad mode for DTensor (FSDP2) parameters: multiplies each local gradient shard by its mask shard
    in an optimizer step pre-hook.

    FSDP2 computes gradients on the all-gathered parameter and assigns the reduce-scattered shard to
    ``.grad`` directly, so tensor hooks on the sharded parameter never fire. The pre-hook runs after
    gradient clipping: the clip norm sees unmasked gradients (with clipping off, results equal
    :class:`GradMaskHooks`).
    """

    def __init__(self, masks: dict[nn.Parameter, torch.Tensor], optimizer):
        self.masks = masks
        self._local = _LocalMasks()
        self._handle = _unwrap(optimizer).register_step_pre_hook(self._apply)

    @torch.no_grad()
    def _apply(self, optimizer, args, kwargs) -> None:
        for p in self.masks:
            if p.grad is not None:
                _local(p.grad).mul_(self._local.get(self.masks, p))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class SoftMasker:
    """Applies the masks of ``importance`` to a model's training, in ``config.mode``.

    ``attach(optimizer)`` installs the masking; ``detach()`` removes every trace. ``update(importance)``
    swaps the importance in place (next domain) without re-creating the optimizer.
    """

    def __init__(self, model: nn.Module, importance: UnitImportance, config: SoftMaskConfig | None = None, layout: UnitLayout | None = None):
        self.model = model
        self.config = config or SoftMaskConfig()
        self.layout = layout or UnitLayout.from_model(model)
        check_adapters_reach_units(self.layout)
        self.importance = importance
        self.masks = build_param_masks(self.layout, importance, self.config)
        self._grad_hooks: GradMaskHooks | ShardedGradMask | None = None
        self._opt_handle = None
        self._optimizer = None

    def _grad_masker(self, optimizer):
        if not any(_is_dtensor(p) for p in self.masks):
            return GradMaskHooks(self.masks)
        if optimizer is None:
            raise ValueError("grad mode on DTensor (FSDP2) parameters needs the optimizer: SoftMasker.attach(optimizer)")
        return ShardedGradMask(self.masks, optimizer)

    def attach(self, optimizer=None) -> "SoftMasker":
        if self.config.mode == "grad":
            self._optimizer = optimizer
            self._grad_hooks = self._grad_masker(optimizer)
        else:
            if optimizer is None:
                raise ValueError("update mode needs the optimizer: SoftMasker.attach(optimizer)")
            self._opt_handle = install_update_masks(optimizer, self.masks, compiled=self.config.compile_update)
        return self

    def update(self, importance: UnitImportance) -> None:
        self.importance = importance
        self.masks = build_param_masks(self.layout, importance, self.config)
        if self._grad_hooks is not None:
            self._grad_hooks.remove()
            self._grad_hooks = self._grad_masker(self._optimizer)
        if self._opt_handle is not None:
            self._opt_handle.update(self.masks)

    def detach(self) -> None:
        if self._grad_hooks is not None:
            self._grad_hooks.remove()
            self._grad_hooks = None
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
