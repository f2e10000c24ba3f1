"""Sparse task vectors ``tau = theta_ft - theta_0`` and task arithmetic ``theta_0 + sum_i lambda_i tau_i``.

A :class:`SparseTaskVector` stores, per parameter, a bit mask of the entries that may differ (1 bit per entry,
:mod:`hf_softmask.core.bitpack`) and their differences in mask order (row-major): exactly the entries a sparse
fine-tuning (TaLoS) was allowed to change. A bit per entry is at most 1/64 of the int64 index per kept entry
that a coordinate list needs once more than 1/64 of the entries are kept (TaLoS keeps 10 % by default).
Saved as safetensors (``<param>.mask`` uint8, ``<param>.values``) with the shapes in the metadata; files with
``<param>.indices`` (the earlier int64 format) still load.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.bitpack import pack_bits, unpack_bits
from ..utils.io import atomic_save_safetensors

__all__ = ["SparseTaskVector", "apply_task_vectors", "TASK_VECTOR_FILE"]

TASK_VECTOR_FILE = "task_vector.safetensors"


@dataclass
class SparseTaskVector:
    """Per-parameter sparse differences: ``masks[name]`` (bit-packed), ``values[name]``, ``shapes[name]``."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def add(self, name: str, mask: torch.Tensor, values: torch.Tensor) -> None:
        """Entry ``name``: bool ``mask`` (the parameter's shape) and the differences of its true entries, row-major."""
        if int(mask.sum()) != values.numel():
            raise ValueError(f"{name}: {values.numel()} values for a mask with {int(mask.sum())} entries")
        self.masks[name] = pack_bits(mask).cpu()
        self.values[name] = values.detach().reshape(-1).cpu()
        self.shapes[name] = tuple(mask.shape)

    def mask(self, name: str) -> torch.Tensor:
        """Bool mask of the entries of ``name`` this vector changes."""
        return unpack_bits(self.masks[name], self.shapes[name])

    def num_entries(self) -> int:
        return sum(int(v.numel()) for v in self.values.values())

    def nbytes(self) -> int:
        """Bytes held: the packed masks plus the values."""
        return sum(
            m.numel() * m.element_size() + self.values[n].numel() * self.values[n].element_size()
            for n, m in self.masks.items()
        )

    def dense(self, name: str) -> torch.Tensor:
        out = torch.zeros(self.shapes[name], dtype=self.values[name].dtype)
        out[self.mask(name)] = self.values[name]
        return out

    def __neg__(self) -> SparseTaskVector:
        return self.scaled(-1.0)

    def scaled(self, scale: float) -> SparseTaskVector:
        return SparseTaskVector(dict(self.masks), {k: v * scale for k, v in self.values.items()}, dict(self.shapes))

    @torch.no_grad()
    def apply_to(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """``theta <- theta + scale * tau`` in place; raises if a parameter is missing or has another shape."""
        params = dict(model.named_parameters())
        for name in self.masks:
            if name not in params:
                raise KeyError(
                    f"task vector entry {name!r} is not a parameter of {type(model).__name__}; "
                    "was it saved for another model?"
                )
            p = params[name]
            if tuple(p.shape) != tuple(self.shapes[name]):
                raise ValueError(
                    f"task vector entry {name!r} has shape {self.shapes[name]} but the parameter has {tuple(p.shape)}"
                )
            m = self.mask(name).to(p.device)
            p[m] += (self.values[name] * scale).to(device=p.device, dtype=p.dtype)
        return model

    def save_pretrained(self, directory: str | os.PathLike, filename: str = TASK_VECTOR_FILE) -> Path:
        path = Path(directory) / filename
        tensors = {}
        for name, mask in self.masks.items():
            tensors[f"{name}.mask"] = mask.contiguous()
            tensors[f"{name}.values"] = self.values[name].contiguous()
        atomic_save_safetensors(
            tensors, path, metadata={"shapes": json.dumps({k: list(v) for k, v in self.shapes.items()})}
        )
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, filename: str = TASK_VECTOR_FILE) -> SparseTaskVector:
        from safetensors import safe_open

        path = Path(directory)
        path = path / filename if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: no saved SparseTaskVector there")
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(v) for k, v in json.loads(f.metadata()["shapes"]).items()}
            keys = set(f.keys())
            tv = cls(shapes=shapes)
            for name, shape in shapes.items():
                tv.values[name] = f.get_tensor(f"{name}.values")
                if f"{name}.mask" in keys:
                    tv.masks[name] = f.get_tensor(f"{name}.mask")
                else:  # the earlier format: flat int64 indices
                    keep = torch.zeros(math.prod(shape), dtype=torch.bool)
                    keep[f.get_tensor(f"{name}.indices")] = True
                    tv.masks[name] = pack_bits(keep)
        return tv


def apply_task_vectors(
    model: nn.Module, vectors: list[SparseTaskVector], scales: list[float] | float = 1.0
) -> nn.Module:
    """Task arithmetic in place: ``theta <- theta + sum_i scales[i] * vectors[i]`` (negative scale: negation)."""
    if not isinstance(scales, (list, tuple)):
        scales = [float(scales)] * len(vectors)
    if len(scales) != len(vectors):
        raise ValueError(f"got {len(vectors)} task vectors but {len(scales)} scales")
    for tv, lam in zip(vectors, scales):
        tv.apply_to(model, lam)
    return model
