"""DTensor (FSDP2 ``fully_shard``, tensor parallel) helpers: is a tensor sharded, and the shard this process holds.

Each helper is the identity on a plain tensor, so code written with them runs unchanged without ``torch.distributed``.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = None

__all__ = ["LocalMasks", "is_dtensor", "local_mask", "local_tensor"]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return _DTensor is not None and isinstance(t, _DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias: in-place ops on it update the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` (broadcastable to the full ``param``) restricted to this process's shard of ``param``.

    A plain parameter gets ``mask`` unchanged. For a DTensor parameter (FSDP2), every mesh dimension that
    shards a tensor dimension along which the mask varies takes the matching chunk of the mask; dimensions
    where the mask broadcasts (size 1) stay whole. No communication: every rank holds the same full mask.
    """
    if not is_dtensor(param) or mask.dim() == 0:
        return mask
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    m = mask.reshape((1,) * (param.dim() - mask.dim()) + tuple(mask.shape))
    placements = []
    for pl in param.placements:
        if isinstance(pl, Shard) and m.shape[pl.dim] != 1:
            placements.append(Shard(pl.dim))
        else:
            placements.append(Replicate())  # Partial/Replicate params, or the mask broadcasts along this dim
    return distribute_tensor(m, param.device_mesh, placements, src_data_rank=None).to_local()


class LocalMasks:
    """Masks keyed by parameter, cut to each parameter's local shard once and reused while unchanged."""

    def __init__(self):
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _entry(self, masks: dict, p: torch.Tensor):
        m = masks.get(p)
        if m is None:
            return None
        hit = self._cache.get(id(p))
        if hit is None or hit[0] is not m:
            local = local_mask(m, p)
            target = local_tensor(p)
            if local.device != target.device:
                local = local.to(target.device)
            # Per-unit (broadcast) masks are small: keep them in the parameter's dtype and in fp32. A per-entry
            # mask (TaLoS, WSN) is parameter-sized: keep it as given, never a second parameter-sized copy.
            small = local.numel() < target.numel()
            if small and local.dtype != target.dtype and target.dtype.is_floating_point:
                local = local.to(target.dtype)
            hit = self._cache[id(p)] = (m, local, local.float() if small else None)
        return hit

    def get(self, masks: dict, p: torch.Tensor) -> torch.Tensor | None:
        """The local mask on the parameter's device (in its dtype when per-unit)."""
        hit = self._entry(masks, p)
        return None if hit is None else hit[1]

    def get_kernel(self, masks: dict, p: torch.Tensor) -> torch.Tensor | None:
        """For a kernel computing in float32: a per-unit mask in float32, a per-entry mask as given (no copy)."""
        hit = self._entry(masks, p)
        if hit is None:
            return None
        return hit[2] if hit[2] is not None else hit[1]

    def get_float(self, masks: dict, p: torch.Tensor) -> torch.Tensor | None:
        """The local mask in float32 (for factors like ``1 - lr*wd*m`` that bf16 would round to 1)."""
        hit = self._entry(masks, p)
        if hit is None:
            return None
        return hit[2] if hit[2] is not None else hit[1].float()
