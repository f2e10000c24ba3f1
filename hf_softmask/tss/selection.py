"""Score tensor -> binary weight mask, with a straight-through gradient back to the scores."""

from __future__ import annotations

import torch

__all__ = ["topk_mask", "threshold_mask", "StraightThroughMask", "straight_through_mask"]


def topk_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Bool mask of exactly ``round(keep_ratio * n)`` (at least 1) highest entries of ``scores``.

    Ties at the cut are broken by position. Uses ``kthvalue`` (no size limit), not ``torch.quantile``, which
    refuses tensors above 2**24 elements.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    k = min(n, max(1, int(round(keep_ratio * n))))
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    # The k-th largest is the (n - k + 1)-th smallest.
    cut = torch.kthvalue(flat.float().cpu() if flat.device.type == "mps" else flat.float(), n - k + 1).values.to(
        flat.device
    )
    above = flat > cut
    need = k - int(above.sum())
    if need > 0:
        ties = flat == cut
        keep_ties = ties & (torch.cumsum(ties.to(torch.int64), 0) <= need)
        above = above | keep_ties
    return above.reshape(scores.shape)


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask ``scores >= threshold``."""
    return scores.detach() >= threshold


class StraightThroughMask(torch.autograd.Function):
    """Forward: the binary mask of ``scores`` as a float tensor.

    Backward: the incoming gradient, unchanged, to ``scores``.

    One gradient per input (``None`` for the non-tensor ones); CLArena's version returns a single gradient for
    two inputs and crashes in backward.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, selection: str, value: float) -> torch.Tensor:
        mask = topk_mask(scores, value) if selection == "topk" else threshold_mask(scores, value)
        return mask.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


def straight_through_mask(scores: torch.Tensor, selection: str, value: float) -> torch.Tensor:
    """Float 0/1 mask of ``scores``.

    ``selection`` 'threshold' with ``value`` = tau, or 'topk' with ``value`` = keep ratio.
    """
    return StraightThroughMask.apply(scores, selection, value)
