"""Sparse task vectors ``tau = theta_ft - theta_0`` and task arithmetic ``theta_0 + sum_i lambda_i tau_i``.

A :class:`SparseTaskVector` stores, per parameter, the flat indices of the entries that may differ
and their differences: exactly the entries a sparse fine-tuning (TaLoS) was allowed to change.
Saved as safetensors (``<param>.indices`` int64, ``<param>.values``) with the shapes in the metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .io import atomic_save_safetensors

__all__ = ["SparseTaskVector", "apply_task_vectors", "TASK_VECTOR_FILE"]

TASK_VECTOR_FILE = "task_vector.safetensors"


@dataclass
class SparseTaskVector:
    """Per-parameter sparse differences: ``indices[name]`` (flat, int64), ``values[name]``, ``shapes[name]``."""

    indices: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_difference(cls, finetuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                        masks: dict[str, torch.Tensor] | None = None) -> "SparseTaskVector":
        """``finetuned - base`` on the entries where ``masks[name]`` is true (all nonzero differences without masks)."""
        tv = cls()
        for name, theta in finetuned.items():
            if name not in base or (masks is not None and name not in masks):
                continue
            diff = (theta.detach().float() - base[name].detach().float().to(theta.device)).flatten()
            keep = masks[name].flatten().bool().to(diff.device) if masks is not None else diff != 0
            idx = keep.nonzero().flatten()
            tv.indices[name] = idx.cpu()
            tv.values[name] = diff[idx].cpu()
            tv.shapes[name] = tuple(theta.shape)
        return tv

    def num_entries(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    def dense(self, name: str) -> torch.Tensor:
        out = torch.zeros(int(torch.tensor(self.shapes[name]).prod()) if self.shapes[name] else 1)
        out[self.indices[name]] = self.values[name]
        return out.view(self.shapes[name])

    def __neg__(self) -> "SparseTaskVector":
        return SparseTaskVector(dict(self.indices), {k: -v for k, v in self.values.items()}, dict(self.shapes))

    def scaled(self, scale: float) -> "SparseTaskVector":
        return SparseTaskVector(dict(self.indices), {k: v * scale for k, v in self.values.items()}, dict(self.shapes))

    @torch.no_grad()
    def apply_to(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """``theta <- theta + scale * tau`` in place; raises if a parameter is missing or has another shape."""
        params = dict(model.named_parameters())
        for name, idx in self.indices.items():
            if name not in params:
                raise KeyError(f"task vector entry {name!r} is not a parameter of {type(model).__name__}; was it saved for another model?")
            p = params[name]
            if tuple(p.shape) != tuple(self.shapes[name]):
                raise ValueError(f"task vector entry {name!r} has shape {self.shapes[name]} but the parameter has {tuple(p.shape)}")
            flat = p.view(-1)
            flat.index_add_(0, idx.to(p.device), (self.values[name] * scale).to(device=p.device, dtype=p.dtype))
        return model

    def save_pretrained(self, directory: str | os.PathLike, filename: str = TASK_VECTOR_FILE) -> Path:
        path = Path(directory) / filename
        tensors = {}
        for name in self.indices:
            tensors[f"{name}.indices"] = self.indices[name].contiguous()
            tensors[f"{name}.values"] = self.values[name].contiguous()
        atomic_save_safetensors(tensors, path, metadata={"shapes": json.dumps({k: list(v) for k, v in self.shapes.items()})})
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, filename: str = TASK_VECTOR_FILE) -> "SparseTaskVector":
        from safetensors import safe_open

        path = Path(directory)
        path = path / filename if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: no saved SparseTaskVector there")
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(v) for k, v in json.loads(f.metadata()["shapes"]).items()}
            tv = cls(shapes=shapes)
            for name in shapes:
                tv.indices[name] = f.get_tensor(f"{name}.indices")
                tv.values[name] = f.get_tensor(f"{name}.values")
        return tv


def apply_task_vectors(model: nn.Module, vectors: list[SparseTaskVector], scales: list[float] | float = 1.0) -> nn.Module:
    """Task arithmetic in place: ``theta <- theta + sum_i scales[i] * vectors[i]`` (negative scale: negation)."""
    if not isinstance(scales, (list, tuple)):
        scales = [float(scales)] * len(vectors)
    if len(scales) != len(vectors):
        raise ValueError(f"got {len(vectors)} task vectors but {len(scales)} scales")
    for tv, lam in zip(vectors, scales):
        tv.apply_to(model, lam)
    return model
