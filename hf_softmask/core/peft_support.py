"""PEFT-wrapped models: the transformers model under the wrapper, and the adapter tensors each unit owns.

A unit (attention head, FFN neuron) owns a slice of the features on one side of a projection: the OUTPUT
features of q/k/v and of the FFN's up/gate projections, the INPUT features of the attention output and FFN
down projections. Under an adapter the same side is found in the adapter's own tensors:

- LoRA (``W + s·B·A``, ``A: [r, in]``, ``B: [out, r]``): on the output side a unit owns its rows of ``lora_B``
  (and of ``lora_B``'s bias with ``lora_bias=True``); on the input side its columns of ``lora_A``. The other
  factor (``lora_A`` of an output-side projection, ``lora_B`` of an input-side one) mixes all units of the
  projection and belongs to none.
- IA3 (a learned vector scaling one side): the vector when it scales the unit's side (``k``/``v`` outputs,
  the down projection's inputs); a vector on the other side belongs to no unit.
- ``modules_to_save``: every copy of the module (the frozen original and each trainable copy) is owned like
  the plain module.

Adapters that mix features in other ways (DoRA and other LoRA variants, AdaLoRA, LoHa, LoKr, OFT, ...) and
prompt-learning methods are refused with a message naming them.
"""

from __future__ import annotations

import functools

from torch import nn

__all__ = [
    "SUPPORTED_PEFT_TYPES",
    "UnsupportedAdapterError",
    "adapter_tensors",
    "base_modules",
    "category_module",
    "check_adapters_reach_units",
    "is_peft_model",
    "is_tuner_layer",
    "plain_modules",
    "unwrap_peft",
]

SUPPORTED_PEFT_TYPES = ("LORA", "IA3")


class UnsupportedAdapterError(ValueError):
    """A PEFT method whose tensors do not split into per-unit slices."""


@functools.cache
def _peft():
    """The peft classes used here, or None when peft is not installed (looked up once)."""
    try:
        from peft import PeftMixedModel, PeftModel
        from peft.tuners.ia3 import IA3Layer
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return None
    return {
        "models": (PeftModel, PeftMixedModel, BaseTuner),
        "layer": BaseTunerLayer,
        "lora": LoraLayer,
        "ia3": IA3Layer,
        "to_save": ModulesToSaveWrapper,
    }


def _check_configs(peft_config: dict) -> None:
    for adapter, cfg in peft_config.items():
        kind = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", None)))
        if kind not in SUPPORTED_PEFT_TYPES:
            raise UnsupportedAdapterError(
                f"adapter {adapter!r} is {kind}: hf_softmask masks per attention head and FFN neuron, which it can do "
                f"for {' and '.join(SUPPORTED_PEFT_TYPES)} adapters only (their tensors split by unit). Use "
                "peft.LoraConfig (or IA3Config) on the attention/FFN projections, or train the unwrapped model."
            )
        if getattr(cfg, "use_dora", False):
            raise UnsupportedAdapterError(
                f"adapter {adapter!r} uses DoRA (use_dora=True): its weight normalisation mixes every unit of a "
                "projection, so no unit owns a slice. Use plain LoRA (use_dora=False)."
            )


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` / ``PeftMixedModel`` / PEFT tuner (``LoraModel``), else ``model``.

    Raises :class:`UnsupportedAdapterError` for a PEFT method other than LoRA or IA3, or for DoRA.
    """
    peft = _peft()
    if peft is None or not isinstance(model, peft["models"]):
        return model
    _check_configs(getattr(model, "peft_config", {}) or {})
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model.model  # a BaseTuner (LoraModel, IA3Model) holds the transformers model as .model


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``PeftModel`` / ``PeftMixedModel`` / PEFT tuner (``LoraModel``); False when peft is not installed."""
    peft = _peft()
    return peft is not None and isinstance(model, peft["models"])


def is_tuner_layer(module: nn.Module) -> bool:
    """True for a PEFT adapter layer (``lora.Linear``, ``ia3.Linear``, ...) wrapping a base layer."""
    peft = _peft()
    return peft is not None and isinstance(module, peft["layer"])


def _check_layer(module: nn.Module, path: str) -> str:
    """ "lora", "ia3" or "plain" for the module at an owned ``path``; refuses any other adapter layer."""
    peft = _peft()
    if peft is None or not isinstance(module, peft["layer"]):
        return "plain"
    if isinstance(module, peft["lora"]) and type(module).adapter_layer_names == peft["lora"].adapter_layer_names:
        variants = {name: type(v).__name__ for name, v in getattr(module, "lora_variant", {}).items()}
        if variants:
            raise UnsupportedAdapterError(
                f"{path}: LoRA variant(s) {variants} (DoRA, aLoRA, ...) change how the update mixes features, so no "
                "unit owns a slice of it. Use plain LoRA."
            )
        return "lora"
    if isinstance(module, peft["ia3"]):
        return "ia3"
    raise UnsupportedAdapterError(
        f"{path} is wrapped by {type(module).__name__}, whose tensors do not split by attention head or FFN neuron. "
        "hf_softmask supports LoRA and IA3 adapters on the attention/FFN projections."
    )


def plain_modules(module: nn.Module) -> list[nn.Module]:
    """The modules holding the full weight at a module path: the module itself, the base layer under an adapter
    layer, or the original and every trainable copy under ``modules_to_save``."""
    peft = _peft()
    if peft is None:
        return [module]
    if isinstance(module, peft["layer"]):
        return plain_modules(module.get_base_layer())
    if isinstance(module, peft["to_save"]):
        copies = [module.original_module, *module.modules_to_save.values()]
        return [m for c in copies for m in plain_modules(c)]
    return [module]


def adapter_tensors(module: nn.Module, side: str, path: str = "") -> list[tuple[nn.Parameter, int]]:
    """``(parameter, axis)`` of the adapter tensors at a module path whose entries along ``axis`` are the
    features of ``side`` (``"out"`` or ``"in"``) of that projection; [] for a plain module."""
    kind = _check_layer(module, path)
    out: list[tuple[nn.Parameter, int]] = []
    if kind == "lora":
        if side == "out":
            for lin in module.lora_B.values():
                out.append((lin.weight, 0))
                if getattr(lin, "bias", None) is not None:
                    out.append((lin.bias, 0))
        else:
            out.extend((lin.weight, 1) for lin in module.lora_A.values())
    elif kind == "ia3" and module.is_feedforward == (side == "in"):
        # ia3_l is [1, in] (scales inputs, "feedforward") or [out, 1] (scales outputs), whatever the base layer.
        out.extend((p, 1 if side == "in" else 0) for p in module.ia3_l.values())
    return out


def category_module(module: nn.Module) -> nn.Module:
    """The module whose type decides the category (embedding, norm, ...) of ``module``'s parameters: the base
    layer for an adapter layer, the module itself otherwise."""
    peft = _peft()
    if peft is not None and isinstance(module, peft["layer"]):
        return module.get_base_layer()
    return module


def base_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the transformers model under any PEFT wrapper, without the adapters' own submodules (LoRA's
    dropout, factors, ...): what the model computes with its adapters removed."""
    inner = unwrap_peft(model)
    adapter_parts: set[int] = set()
    for module in inner.modules():
        if is_tuner_layer(module):
            kept = {id(m) for m in module.get_base_layer().modules()}
            adapter_parts.update(id(m) for m in module.modules() if id(m) not in kept)
    return [m for m in inner.modules() if id(m) not in adapter_parts]


def check_adapters_reach_units(layout) -> None:
    """Refuse soft-masking a PEFT model whose adapters train no slice any unit owns (e.g. LoRA on ``lm_head``
    only): every unit is frozen already, so masks would protect nothing that can change."""
    model = layout.model
    peft = _peft()
    if peft is None:
        return
    wrapped = isinstance(model, peft["models"]) or any(isinstance(m, peft["layer"]) for m in model.modules())
    if not wrapped or any(s.param.requires_grad for s in layout.owned):
        return
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if trained:
        shown = ", ".join(trained[:3]) + (", ..." if len(trained) > 3 else "")
        raise UnsupportedAdapterError(
            f"the adapters of this {type(model).__name__} train no parameter "
            "that an attention head or FFN neuron owns "
            f"(trainable: {shown}), so soft-masking has nothing to protect. Put the adapters on the attention/FFN "
            f"projections (LoRA target_modules) or train without soft-masking."
        )
