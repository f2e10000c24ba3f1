"""Gradient clipping by the norm of the gradients an update-masked optimizer actually applies.

With update masks the optimizer moves a unit with mask ``m`` by ``m`` times its update, so the gradient it
effectively applies is ``m * g``. The Trainer's ``max_grad_norm`` clips by the norm of the raw gradients, where
protected units' gradients (which move nothing) count and shorten the free units' steps. :class:`MaskedClipMixin`
makes a Trainer clip by ``||m * g||`` instead, which is also the norm grad mode clips: under SGD without weight
decay, update and grad mode then move every parameter alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .dtensor import LocalMasks, is_dtensor, local_tensor
from .optim import MaskDict, local_masks_of, unwrap_optimizer, update_masks_of

__all__ = ["MaskedClipMixin", "clip_masked_grad_norm_", "clips_masked", "masked_grad_norm"]

#: Set on the inner optimizer by :class:`MaskedClipMixin`: its Trainer clips by the masked norm.
_CLIPS_MASKED = "_hf_softmask_clips_masked"


def _squared_norm(g: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """``||m * g||**2`` in float32; a per-unit (broadcast) ``m`` costs no gradient-sized temporary."""
    if m is None:
        return torch.linalg.vector_norm(g, dtype=torch.float32).square()
    mm = m.reshape((1,) * (g.dim() - m.dim()) + tuple(m.shape))
    dims = tuple(d for d in range(g.dim()) if mm.shape[d] == 1 and g.shape[d] != 1)
    if not dims:  # a per-entry mask (TaLoS, WSN)
        return torch.linalg.vector_norm(g * m, dtype=torch.float32).square()
    # ||m * g||**2 = sum over units of m_u**2 * ||g_u||**2: reduce along the dimensions the mask broadcasts over.
    unit = torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=torch.float32)
    return (unit * mm.float()).square().sum()


def masked_grad_norm(parameters: Iterable[torch.Tensor], masks: MaskDict, optimizer=None) -> torch.Tensor:
    """The 2-norm of all gradients, each multiplied by its mask (parameters without a mask: by 1), as float32.

    DTensor (FSDP2) gradients contribute their local shard with the matching shard of the mask; the shards' sums
    are reduced over their device mesh. ``optimizer``: whose cache of local masks to reuse (optional).
    """
    local_masks = local_masks_of(optimizer) if optimizer is not None else LocalMasks()
    plain: list[torch.Tensor] = []
    sharded: dict[tuple, list[torch.Tensor]] = {}
    device = None
    for p in parameters:
        if p.grad is None:
            continue
        g = p.grad
        sq = _squared_norm(local_tensor(g), local_masks.get_kernel(masks, p))
        device = device or sq.device
        if is_dtensor(g):
            sharded.setdefault((g.device_mesh, tuple(g.placements)), []).append(sq)
        else:
            plain.append(sq)
    if device is None:
        return torch.zeros(())
    total = torch.stack(plain).sum() if plain else torch.zeros((), device=device)
    for (mesh, placements), parts in sharded.items():
        total = total + _reduce_shards(torch.stack(parts).sum(), mesh, placements).to(total.device)
    return total.sqrt()


def _reduce_shards(local_sum: torch.Tensor, mesh, placements) -> torch.Tensor:
    # Sharded mesh dimensions hold disjoint pieces (sum them), replicated ones the same piece (count it once).
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    if any(not isinstance(pl, (Shard, Replicate)) for pl in placements):
        raise ValueError(f"masked gradient clipping needs sharded or replicated gradients, got {placements}")
    out = [Partial() if isinstance(pl, Shard) else Replicate() for pl in placements]
    return DTensor.from_local(local_sum, mesh, out, run_check=False).full_tensor()


@torch.no_grad()
def clip_masked_grad_norm_(
    parameters: Iterable[torch.Tensor], masks: MaskDict, max_norm: float, optimizer=None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the norm of the masked gradients (:func:`masked_grad_norm`):
    every gradient (not masked, so the optimizer's state still sees the raw direction) is scaled by
    ``min(1, max_norm / (norm + 1e-6))``. Returns that norm."""
    parameters = [p for p in parameters if p.grad is not None]
    total = masked_grad_norm(parameters, masks, optimizer)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def clips_masked(optimizer) -> bool:
    """Whether ``optimizer`` (torch or accelerate-wrapped) is driven by a Trainer with :class:`MaskedClipMixin`."""
    return bool(unwrap_optimizer(optimizer).__dict__.get(_CLIPS_MASKED))


class MaskedClipMixin:
    """Trainer mixin: when the optimizer carries update masks, ``max_grad_norm`` clips the masked gradients.

    ``class MyTrainer(MaskedClipMixin, Trainer)``; :class:`~hf_softmask.SoftMaskTrainer` and
    :class:`~hf_softmask.strategies.StrategyTrainer` have it. The logged ``grad_norm`` is then the masked norm.
    Without update masks (grad mode, plain training) the Trainer clips as usual.
    """

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        unwrap_optimizer(optimizer).__dict__[_CLIPS_MASKED] = True
        return optimizer

    def _clip_grad_norm(self, model):
        from accelerate.utils import DistributedType

        optimizer = unwrap_optimizer(self.optimizer)
        masks = update_masks_of(optimizer)
        # DeepSpeed clips inside its engine (and cannot take update masks); XLA reduces gradients in its clip.
        if not masks or self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.XLA):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # what accelerate's clip_grad_norm_ does first under a GradScaler
        return clip_masked_grad_norm_(model.parameters(), masks, self.args.max_grad_norm, optimizer)
