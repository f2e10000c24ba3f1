"""From unit importance to per-parameter soft masks, applied to gradients or to updates."""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .dtensor import LocalMasks, is_dtensor, local_tensor
from .importance import UnitImportance
from .layout import UNOWNED_CATEGORIES, UnitLayout
from .optim import install_update_masks, unwrap_optimizer
from .peft_support import check_adapters_reach_units

__all__ = [
    "MODES",
    "POLICIES",
    "FrozenGradients",
    "GradMaskHooks",
    "ShardedGradMask",
    "SoftMaskConfig",
    "SoftMasker",
    "build_named_masks",
    "build_param_masks",
    "mask_statistics",
    "is_per_layer_key",
    "resolve_masks",
]

POLICIES = ("train", "freeze", "mean")
MODES = ("update", "grad")
COMPILE_UPDATE = ("auto", True, False)


@dataclass
class SoftMaskConfig:
    """How importance turns into masks.

    The one declaration of the soft-mask settings: each field is also a ``--softmask_<field>`` flag of
    ``SoftMaskTrainingArguments`` and of the pre-training runner (:mod:`hf_softmask.core.softmask_arguments`).
    """

    mode: str = field(
        default="update",
        metadata={
            "help": "'update': scale the optimizer's whole change of each owned slice by 1-I "
            "(holds under Adam/AdamW, weight decay included). 'grad': scale gradients "
            "(the DAS paper; Adam largely cancels it).",
            "choices": MODES,
        },
    )
    embeddings: str = field(
        default="train",
        metadata={"help": "Policy for embeddings ('mean': mask by the mean unit mask).", "choices": POLICIES},
    )
    norms: str = field(
        default="train",
        metadata={
            "help": "Policy for LayerNorm/RMSNorm ('mean': mask by the mean mask of the norm's layer).",
            "choices": POLICIES,
        },
    )
    task_head: str = field(
        default="train",
        metadata={
            "help": "Policy for parameters outside the base model (LM head, classifier). A head tied to the input "
            "embeddings is one tensor: it follows the more protective of this and 'embeddings' (a warning says so).",
            "choices": POLICIES,
        },
    )
    other: str = field(
        default="train",
        metadata={
            "help": "Policy for other unowned parameters (output-projection biases, pooler).",
            "choices": POLICIES,
        },
    )
    mask_power: float = field(
        default=1.0,
        metadata={"help": "Mask = 1 - I**p. p>1 protects only the most important units; p<1 protects more broadly."},
    )
    # A Literal, not ``bool | str``: HfArgumentParser turns ``bool | str`` into a bool flag that refuses 'auto'.
    compile_update: Literal["auto", True, False] = field(
        default="auto",
        metadata={
            "help": "Update mode with Adam/AdamW: run the masked update through torch.compile, "
            "one fused pass per tensor (as fast "
            "as torch's fused AdamW; the first step compiles). 'auto': when the optimizer is fused and big enough "
            "(hf_softmask.core.optim.resolve_compiled).",
            "choices": COMPILE_UPDATE,
        },
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for cat in UNOWNED_CATEGORIES:
            if getattr(self, cat) not in POLICIES:
                raise ValueError(f"{cat} policy must be one of {POLICIES}, got {getattr(self, cat)!r}")
        if not self.mask_power > 0:
            raise ValueError(f"mask_power must be > 0, got {self.mask_power}")
        if isinstance(self.compile_update, str) and self.compile_update.lower() in ("true", "false"):
            self.compile_update = self.compile_update.lower() == "true"  # from a command line
        if self.compile_update not in COMPILE_UPDATE:
            raise ValueError(f"compile_update must be True, False or 'auto', got {self.compile_update!r}")


logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"\.(\d+)\.")


def build_named_masks(
    layout: UnitLayout, importance: UnitImportance, config: SoftMaskConfig | None = None
) -> dict[str, torch.Tensor]:
    """Masks keyed by parameter NAME, each broadcastable to it: ``1 - I**p`` on owned slices, policies elsewhere.

    Names survive what replaces parameter objects (FSDP2's ``fully_shard``); see :meth:`SoftMasker.attach`.
    Parameters with policy "train" get no entry (they are not masked at all). Masks are float32 on the CPU.
    """
    config = config or SoftMaskConfig()
    importance.validate_for(layout)
    imp_h = importance.heads.float().cpu() ** config.mask_power
    imp_f = importance.ffn.float().cpu() ** config.mask_power
    masks: dict[str, torch.Tensor] = {}
    for s in layout.owned:
        unit_mask = 1.0 - layout.unit_values(s.kind, s.layer, imp_h, imp_f)
        masks[s.name] = unit_mask[s.index].view(s.broadcast_shape())

    layer_mean = torch.cat([1 - imp_h, 1 - imp_f], dim=1).mean(1)

    def policy_mask(cat: str, name: str) -> torch.Tensor | None:
        """The mask of unowned parameter ``name`` in category ``cat`` under its policy (None: trained as is)."""
        policy = getattr(config, cat)
        if policy == "freeze":
            return torch.zeros(())
        if policy == "mean":
            m = _LAYER_RE.search(name)
            layer = int(m.group(1)) if m and cat == "norms" else layout.num_layers
            return torch.tensor(float(layer_mean[layer] if layer < layout.num_layers else layer_mean.mean()))
        return None

    for cat, params in layout.unowned_parameters().items():
        for name, _ in params:
            mask = policy_mask(cat, name)
            if mask is not None:
                masks[name] = mask
    for first, aliases in layout.tied_unowned().items():
        _hold_tied(masks, first, {n: (c, getattr(config, c), policy_mask(c, n)) for n, c in aliases.items()}, layout)
    return masks


_STRICTNESS = ("freeze", "mean", "train")  # the most protective policy first

# Models already told how a tied tensor's policies were settled (once per model and message, not per domain).
_TIE_TOLD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hold_tied(masks: dict, first: str, asked: dict[str, tuple], layout: UnitLayout) -> None:
    """One tensor under several names (``asked``: name -> (category, policy, mask)) takes the most protective mask,
    the smallest (freeze 0 < mean < train 1; at equal masks the stricter policy is named); a warning names every name
    and policy when the policies differ."""
    strongest = min(
        asked, key=lambda n: (1.0 if asked[n][2] is None else float(asked[n][2]), _STRICTNESS.index(asked[n][1]))
    )
    mask = asked[strongest][2]
    if mask is None:
        masks.pop(first, None)
    else:
        masks[first] = mask
    if len({policy for _, policy, _ in asked.values()}) == 1:
        return
    names = ", ".join(f"{n} ({cat}={policy!r})" for n, (cat, policy, _) in asked.items())
    message = (
        f"tied parameters: {names} are one tensor; it follows {asked[strongest][0]}={asked[strongest][1]!r}, "
        "the more protective policy"
    )
    told = _TIE_TOLD.setdefault(layout.model, set())
    if message not in told:
        told.add(message)
        logger.warning(message)


def resolve_masks(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    """``named`` masks keyed by ``model``'s current parameter objects, on each parameter's device and dtype."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in named if n not in params]
    if missing:
        raise ValueError(
            f"{len(missing)} masked parameters are not parameters of {type(model).__name__} (e.g. {missing[:3]}); "
            "build the masks (SoftMasker / UnitLayout) from this model"
        )
    return {params[n]: m.to(device=params[n].device, dtype=params[n].dtype) for n, m in named.items()}


def build_param_masks(
    layout: UnitLayout, importance: UnitImportance, config: SoftMaskConfig | None = None
) -> dict[nn.Parameter, torch.Tensor]:
    """:func:`build_named_masks` keyed by the current parameters of the layout's model."""
    return resolve_masks(layout.model, build_named_masks(layout, importance, config))


def mask_statistics(
    importance: UnitImportance, mask_power: float = 1.0, threshold: float = 0.5, prefix: str = "softmask/"
) -> dict[str, float]:
    """Scalars for ``report_to``: the mean soft mask ``1 - I**p`` of all heads and all FFN neurons, of each layer's
    (keys ending ``/layer_<l>``, see :func:`is_per_layer_key`), and the fraction of units (heads, FFN neurons, all)
    whose importance exceeds ``threshold``."""
    heads, ffn = importance.heads.float().cpu(), importance.ffn.float().cpu()
    out: dict[str, float] = {}
    for kind, imp in (("heads", heads), ("ffn", ffn)):
        mask = 1 - imp**mask_power
        out[f"{prefix}mask_mean_{kind}"] = float(mask.mean())
        for layer, value in enumerate(mask.mean(1).tolist()):
            out[f"{prefix}mask_mean_{kind}/layer_{layer}"] = value
    for kind, imp in (("heads", heads), ("ffn", ffn), ("all", torch.cat([heads.flatten(), ffn.flatten()]))):
        out[f"{prefix}frac_importance_gt_{threshold:g}_{kind}"] = float((imp > threshold).float().mean())
    return out


def is_per_layer_key(key: str) -> bool:
    """Whether a :func:`mask_statistics` key is a per-layer detail (kept out of the console and ``log_history``,
    whose lines it would fill with one key per layer, and given to the ``report_to`` integrations)."""
    return "/layer_" in key


class GradMaskHooks:
    """Multiplies each parameter's incoming gradient by its mask (tensor hooks).

    The hook fires on every backward, before the gradient is accumulated into ``.grad``: with
    gradient accumulation the optimizer sees ``m * sum(g)`` (not ``m**k``), and clipping, run later,
    sees masked gradients.
    """

    def __init__(self, masks: dict[nn.Parameter, torch.Tensor]):
        if any(is_dtensor(p) for p in masks):
            # FSDP2 assigns reduce-scattered gradients to .grad directly: these hooks would never fire.
            raise ValueError(
                "GradMaskHooks cannot mask DTensor (FSDP2) parameters; use ShardedGradMask(masks, optimizer) "
                "or SoftMasker, which picks it"
            )
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
        self._local = LocalMasks()
        self._handle = unwrap_optimizer(optimizer).register_step_pre_hook(self._apply)

    @torch.no_grad()
    def _apply(self, optimizer, args, kwargs) -> None:
        for p in self.masks:
            if p.grad is not None:
                local_tensor(p.grad).mul_(self._local.get(self.masks, p))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class FrozenGradients:
    """Grad mode, policy ``freeze``: drops the gradients of wholly frozen parameters in an optimizer step pre-hook.

    A zeroed gradient does not stop AdamW's (or SGD's) weight decay from moving the parameter; an optimizer
    skips a parameter without ``.grad`` entirely (no decay, no state update). The hook runs inside the
    optimizer's step however it is reached (accelerate, GradScaler), after gradient clipping.
    """

    def __init__(self, params: list[nn.Parameter], optimizer):
        self.params = params
        self._handle = unwrap_optimizer(optimizer).register_step_pre_hook(self._drop)

    def _drop(self, optimizer, args, kwargs) -> None:
        for p in self.params:
            p.grad = None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class SoftMasker:
    """Applies the masks of ``importance`` to a model's training, in ``config.mode``.

    ``attach(optimizer)`` installs the masking; ``detach()`` removes every trace. ``update(importance)``
    swaps the importance in place (next domain) without re-creating the optimizer.

    Masks are built by parameter name and resolved against the model's parameters at ``attach`` (train begin):
    a SoftMasker or layout built before ``fully_shard`` (which replaces every parameter) still masks the
    sharded parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        importance: UnitImportance,
        config: SoftMaskConfig | None = None,
        layout: UnitLayout | None = None,
    ):
        self.model = model
        self.config = config or SoftMaskConfig()
        self.layout = layout or UnitLayout.from_model(model)
        check_adapters_reach_units(self.layout)
        self.importance = importance
        self.named_masks = build_named_masks(self.layout, importance, self.config)
        self.masks = resolve_masks(model, self.named_masks)
        self._grad_hooks: list = []
        self._opt_handle = None
        self._optimizer = None

    def _grad_maskers(self, optimizer) -> list:
        frozen = [p for p, m in self.masks.items() if m.dim() == 0 and float(m) == 0 and p.requires_grad]
        out = []
        if frozen:
            if optimizer is None:
                raise ValueError(
                    "grad mode with policy 'freeze' needs the optimizer (weight decay would still move frozen "
                    "parameters): SoftMasker.attach(optimizer)"
                )
            out.append(FrozenGradients(frozen, optimizer))
        if not any(is_dtensor(p) for p in self.masks):
            return [GradMaskHooks(self.masks), *out]
        if optimizer is None:
            raise ValueError(
                "grad mode on DTensor (FSDP2) parameters needs the optimizer: SoftMasker.attach(optimizer)"
            )
        return [ShardedGradMask(self.masks, optimizer), *out]

    def attach(self, optimizer=None) -> SoftMasker:
        self.masks = resolve_masks(self.model, self.named_masks)  # the parameters as they are now (after sharding)
        if self.config.mode == "grad":
            self._optimizer = optimizer
            self._grad_hooks = self._grad_maskers(optimizer)
        else:
            if optimizer is None:
                raise ValueError("update mode needs the optimizer: SoftMasker.attach(optimizer)")
            self._opt_handle = install_update_masks(optimizer, self.masks, compiled=self.config.compile_update)
        return self

    def update(self, importance: UnitImportance) -> None:
        self.importance = importance
        self.named_masks = build_named_masks(self.layout, importance, self.config)
        self.masks = resolve_masks(self.model, self.named_masks)
        if self._grad_hooks:
            self._remove_grad_hooks()
            self._grad_hooks = self._grad_maskers(self._optimizer)
        if self._opt_handle is not None:
            self._opt_handle.update(self.masks)

    def statistics(self, threshold: float = 0.5) -> dict[str, float]:
        """:func:`mask_statistics` of the current importance (what ``report_to`` gets at logging steps)."""
        return mask_statistics(self.importance, self.config.mask_power, threshold)

    def _remove_grad_hooks(self) -> None:
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []

    def detach(self) -> None:
        self._remove_grad_hooks()
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
