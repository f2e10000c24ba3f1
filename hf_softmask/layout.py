"""UnitLayout: the attention heads and FFN neurons of a loaded model and the parameter slices each owns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import ArchitectureSpec, get_architecture

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
    """(in_features, out_features) of a Linear or Conv1D module."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])


class UnitLayout:
    """Heads and FFN neurons of ``model``, found through the architecture registry.

    Attributes: ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``ffn_size``,
    ``attn_out_modules`` / ``ffn_out_modules`` (where gates hook in), ``owned`` (list of
    :class:`OwnedSlice`).
    """

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, model_type: str):
        self.model_type = model_type
        self.spec = spec
        config = model.config
        base = getattr(model, "base_model", model)
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
            attn_in_features, _ = _features(attn_out, conv)
            ffn_in_features, _ = _features(ffn_out, conv)
            if attn_in_features % self.num_heads:
                raise ValueError(f"layer {l}: {spec.attn_out} has {attn_in_features} inputs, not divisible by {self.num_heads} heads")
            d = attn_in_features // self.num_heads
            if head_dim not in (None, d) or ffn_size not in (None, ffn_in_features):
                raise ValueError("layers of different shapes are not supported")
            head_dim, ffn_size = d, ffn_in_features

            def own(module: nn.Module, kind: str, axis: int, index: torch.Tensor, with_bias: bool) -> None:
                self.owned.append(OwnedSlice(names[id(module.weight)], module.weight, kind, l, axis, index))
                if with_bias and getattr(module, "bias", None) is not None:
                    self.owned.append(OwnedSlice(names[id(module.bias)], module.bias, kind, l, 0, index))

            heads_idx = torch.arange(self.num_heads * d) // d
            if spec.fused_qkv:
                qkv = _get_submodule(block, spec.query)
                own(qkv, "head", out_axis, heads_idx.repeat(3), with_bias=True)
            else:
                own(_get_submodule(block, spec.query), "head", out_axis, heads_idx, with_bias=True)
                kv_kind = "head" if self.num_kv_heads == self.num_heads else "kv_head"
                kv_idx = torch.arange(self.num_kv_heads * d) // d
                own(_get_submodule(block, spec.key), kv_kind, out_axis, kv_idx, with_bias=True)
                own(_get_submodule(block, spec.value), kv_kind, out_axis, kv_idx, with_bias=True)
            own(attn_out, "head", in_axis, heads_idx, with_bias=False)
            ffn_idx = torch.arange(ffn_in_features)
            for path in spec.ffn_in:
                own(_get_submodule(block, path), "ffn", out_axis, ffn_idx, with_bias=True)
            own(ffn_out, "ffn", in_axis, ffn_idx, with_bias=False)
        self.head_dim = head_dim
        self.ffn_size = ffn_size
        self._model_ref = model

    @classmethod
    def from_model(cls, model: nn.Module) -> "UnitLayout":
        """Build the layout of a transformers model; raises UnsupportedModelError for unknown types."""
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"{type(model).__name__} has no .config; pass a transformers PreTrainedModel")
        model_type = config.model_type
        return cls(model, get_architecture(model_type), model_type)

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
        model = model if model is not None else self._model_ref
        # By name: fully_shard replaces every parameter object after the layout was built, not the names.
        owned = {s.name for s in self.owned}
        base_ids = {id(p) for p in self.base_model.parameters()}
        kind_of: dict[int, str] = {}
        for module in model.modules():
            cat = None
            if isinstance(module, nn.Embedding) or "Embedding" in type(module).__name__:
                cat = "embeddings"
            elif "Norm" in type(module).__name__:
                cat = "norms"
            if cat:
                for p in module.parameters(recurse=False):
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

    def __repr__(self) -> str:
        return (
            f"UnitLayout(model_type={self.model_type!r}, num_layers={self.num_layers}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, ffn_size={self.ffn_size})"
        )
