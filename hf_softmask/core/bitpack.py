"""Binary masks stored at one bit per entry (uint8, most significant bit first, like ``numpy.packbits``)."""

from __future__ import annotations

import math

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def packed_nbytes(numel: int) -> int:
    """Bytes :func:`pack_bits` uses for a mask of ``numel`` entries: ``ceil(numel / 8)``."""
    return math.ceil(numel / 8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat uint8 tensor of ``ceil(mask.numel() / 8)`` bytes holding ``mask != 0`` row-major, MSB first."""
    flat = (mask.detach().reshape(-1) != 0).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # Weighted sum of 8 bits fits in a byte (max 255); do it in int32 to avoid uint8 overflow on some backends.
    return (flat.view(-1, 8).to(torch.int32) * _WEIGHTS.to(flat.device, torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Bool tensor of ``shape`` from the bytes written by :func:`pack_bits`."""
    shape = torch.Size(shape)
    n = shape.numel()
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"expected a flat uint8 tensor of packed bits, got {packed.dtype} with shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_nbytes(n):
        raise ValueError(
            f"{packed.numel()} packed bytes cannot hold a mask of shape {tuple(shape)} (needs {packed_nbytes(n)})"
        )
    bits = packed.unsqueeze(1).bitwise_and(_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:n].reshape(shape)
