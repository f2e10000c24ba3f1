"""UnitLayout: the attention heads and FFN neurons of a loaded model and the parameter slices each owns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architectures import ArchitectureSpec, get_architecture
from .compatibility import refuse_fsdp1
from .peft_support import adapter_tensors, category_module, is_tuner_layer, plain_modules, unwrap_peft

__all__ = ["UnitLayout", "OwnedSlice", "UNOWNED_CATEGORIES"]

UNOWNED_CATEGORIES = ("embeddings", "norms", "task_head", "other")


@dataclass
class OwnedSlice:
    """One parameter whose entries along ``axis`` belong to units of ``kind`` in layer ``layer``.

    ``index[p]`` is the unit (head, kv-head or neuron) owning position ``p`` of ``axis``.
    ``kind`` is ``"head"``, ``"kv_head"`` (shared by a GQA group) or ``"ffn"``.
    """

    name: str
    param: nn.Parameter
    kind: str
    layer: int
    axis: int
    index: torch.Tensor

    def broadcast_shape(self) -> tuple[int, ...]:
        shape = [1] * self.param.dim()
        shape[self.axis] = -1
        return tuple(shape)


def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise AttributeError(f"module path {path!r} not found under {type(root).__name__}: {err}") from None


def _features(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D module, or of the base layer under an adapter."""
    if is_tuner_layer(module):  # the adapter layer records them; its base weight may be quantized (packed)
        return module.in_features, module.out_features
    w = plain_modules(module)[0].weight
    return (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])


def _alias_category(model: nn.Module, name: str, base_modules: set[int]) -> str:
    """The unowned category of parameter ``name`` judged by the module holding it under that name."""
    holder = model.get_submodule(name.rpartition(".")[0])
    if id(holder) not in base_modules:
        return "task_head"
    typed = category_module(holder)
    if isinstance(typed, nn.Embedding) or "Embedding" in type(typed).__name__:
        return "embeddings"
    return "norms" if "Norm" in type(typed).__name__ else "other"


class UnitLayout:
    """Heads and FFN neurons of ``model``, found through the architecture registry.

    Attributes: ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``ffn_size``,
    ``attn_out_modules`` / ``ffn_out_modules`` (where gates hook in), ``ffn_act_modules`` (the FFN activations,
    for gates before them; None if the spec names none), ``owned`` (list of :class:`OwnedSlice`).

    ``model`` may be wrapped by PEFT (``get_peft_model``, or adapters added with ``add_adapter``): the layout is
    found in the transformers model under the wrapper. Gates hook the module at each path, i.e. the adapter
    layer, so a gate scales the unit's output through the base weight and the adapter alike. Each unit owns its
    slices of the base weights (frozen under LoRA: their masks then have no effect) and of the adapter tensors
    (see :mod:`hf_softmask.core.peft_support`); ``OwnedSlice.name`` is the parameter's name in ``model``.
    """

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, model_type: str):
        # Before anything is indexed: FSDP1's flat parameters would fail below as a KeyError on a weight.
        refuse_fsdp1(model, "UnitLayout")
        self.model_type = model_type
        self.spec = spec
        inner = unwrap_peft(model)
        config = inner.config
        base = getattr(inner, "base_model", inner)
        self.base_model = base
        layers = _get_submodule(base, spec.layers)
        self.num_layers = len(layers)
        self.num_heads = int(getattr(config, spec.num_heads_attr))
        kv = getattr(config, spec.num_kv_heads_attr, None) if spec.num_kv_heads_attr else None
        self.num_kv_heads = int(kv) if kv else self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

        self.attn_out_modules: list[nn.Module] = []
        self.ffn_out_modules: list[nn.Module] = []
        # The FFN activation of every layer (spec.ffn_act), where FFN gates before the activation hook in.
        self.ffn_act_modules: list[nn.Module] | None = [] if spec.ffn_act else None
        self.owned: list[OwnedSlice] = []
        names = {id(p): n for n, p in model.named_parameters()}
        conv = spec.conv1d
        out_axis, in_axis = (1, 0) if conv else (0, 1)
        head_dim = ffn_size = None
        for l, block in enumerate(layers):
            attn_out = _get_submodule(block, spec.attn_out)
            ffn_out = _get_submodule(block, spec.ffn_out)
            self.attn_out_modules.append(attn_out)
            self.ffn_out_modules.append(ffn_out)
            if self.ffn_act_modules is not None:
                self.ffn_act_modules.append(_get_submodule(block, spec.ffn_act))
            attn_in_features, _ = _features(attn_out, conv)
            ffn_in_features, _ = _features(ffn_out, conv)
            if attn_in_features % self.num_heads:
                raise ValueError(
                    f"layer {l}: {spec.attn_out} has {attn_in_features} inputs, "
                    f"not divisible by {self.num_heads} heads"
                )
            d = attn_in_features // self.num_heads
            if head_dim not in (None, d) or ffn_size not in (None, ffn_in_features):
                raise ValueError("layers of different shapes are not supported")
            head_dim, ffn_size = d, ffn_in_features

            def own(module: nn.Module, path: str, kind: str, side: str, index: torch.Tensor, l: int = l) -> None:
                """Own ``index``'s units along the ``side`` ("out"/"in") features of the module at ``path``."""
                axis = out_axis if side == "out" else in_axis
                tensors = []
                for plain in plain_modules(module):
                    # Integer (quantized, e.g. 4-bit) base weights never train: they get no mask.
                    if plain.weight.is_floating_point():
                        tensors.append((plain.weight, axis))
                    if side == "out" and getattr(plain, "bias", None) is not None:
                        tensors.append((plain.bias, 0))
                tensors += adapter_tensors(module, side, f"layer {l}: {path}")
                for p, ax in tensors:
                    self.owned.append(OwnedSlice(names[id(p)], p, kind, l, ax, index))

            heads_idx = torch.arange(self.num_heads * d) // d
            if spec.fused_qkv:
                own(_get_submodule(block, spec.query), spec.query, "head", "out", heads_idx.repeat(3))
            else:
                own(_get_submodule(block, spec.query), spec.query, "head", "out", heads_idx)
                kv_kind = "head" if self.num_kv_heads == self.num_heads else "kv_head"
                kv_idx = torch.arange(self.num_kv_heads * d) // d
                own(_get_submodule(block, spec.key), spec.key, kv_kind, "out", kv_idx)
                own(_get_submodule(block, spec.value), spec.value, kv_kind, "out", kv_idx)
            own(attn_out, spec.attn_out, "head", "in", heads_idx)
            ffn_idx = torch.arange(ffn_in_features)
            for path in spec.ffn_in:
                own(_get_submodule(block, path), path, "ffn", "out", ffn_idx)
            own(ffn_out, spec.ffn_out, "ffn", "in", ffn_idx)
        self.head_dim = head_dim
        self.ffn_size = ffn_size
        self._model = model

    @classmethod
    def from_model(cls, model: nn.Module) -> UnitLayout:
        """Build the layout of a transformers model (PEFT-wrapped or not); raises UnsupportedModelError for unknown
        types."""
        config = getattr(unwrap_peft(model), "config", None)
        if config is None:
            raise TypeError(f"{type(model).__name__} has no .config; pass a transformers PreTrainedModel")
        model_type = config.model_type
        return cls(model, get_architecture(model_type), model_type)

    @property
    def model(self) -> nn.Module:
        """The model this layout was built from (strategies compare it to the model they are handed)."""
        return self._model

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def signature(self) -> dict:
        """Shape facts that importance saved for this layout must match."""
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "ffn_size": self.ffn_size,
        }

    def unit_values(self, kind: str, layer: int, heads: torch.Tensor, ffn: torch.Tensor) -> torch.Tensor:
        """Per-unit values of ``kind`` in ``layer``; kv-heads take the max over the query heads sharing them."""
        if kind == "head":
            return heads[layer]
        if kind == "kv_head":
            return heads[layer].view(self.num_kv_heads, self.group_size).amax(-1)
        if kind == "ffn":
            return ffn[layer]
        raise ValueError(f"unknown unit kind {kind!r}")

    def owned_parameter_ids(self) -> set[int]:
        return {id(s.param) for s in self.owned}

    def unowned_parameters(self, model: nn.Module | None = None) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters no unit owns, by category: embeddings, norms, task_head, other."""
        model = model if model is not None else self._model
        # By name: fully_shard replaces every parameter object after the layout was built, not the names.
        owned = {s.name for s in self.owned}
        base_ids = {id(p) for p in self.base_model.parameters()}
        kind_of: dict[int, str] = {}
        for module in model.modules():
            cat = None
            typed = category_module(module)  # an adapter's tensors fall in the category of the layer they adapt
            if isinstance(typed, nn.Embedding) or "Embedding" in type(typed).__name__:
                cat = "embeddings"
            elif "Norm" in type(typed).__name__:
                cat = "norms"
            if cat:
                for p in module.parameters(recurse=typed is not module):
                    kind_of.setdefault(id(p), cat)
        out: dict[str, list] = {c: [] for c in UNOWNED_CATEGORIES}
        for name, p in model.named_parameters():
            if name in owned:
                continue
            if id(p) not in base_ids:
                cat = "task_head"
            else:
                cat = kind_of.get(id(p), "other")
            out[cat].append((name, p))
        return out

    def tied_unowned(self, model: nn.Module | None = None) -> dict[str, dict[str, str]]:
        """Unowned tensors reachable under several names (an LM head tied to the input embeddings): for each, its
        name in :meth:`unowned_parameters` -> ``{every name: the category that name alone would put it in}``.

        ``named_parameters()`` lists a shared tensor once, under its first name (``model.embed_tokens.weight``);
        ``lm_head.weight``, the same tensor, is an alias in the ``task_head`` category.
        """
        model = model if model is not None else self._model
        category = {}  # canonical name -> its category
        canonical = {}  # id -> canonical name
        for cat, params in self.unowned_parameters(model).items():
            for name, p in params:
                category[name], canonical[id(p)] = cat, name
        base_modules = {id(m) for m in self.base_model.modules()}
        names: dict[str, dict[str, str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            first = canonical.get(id(p))
            if first is not None:
                names.setdefault(first, {first: category[first]})
                if name != first:
                    names[first][name] = _alias_category(model, name, base_modules)
        return {first: aliases for first, aliases in names.items() if len(aliases) > 1}

    def __repr__(self) -> str:
        return (
            f"UnitLayout(model_type={self.model_type!r}, num_layers={self.num_layers}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, ffn_size={self.ffn_size})"
        )
