"""Optimizers whose whole update of a parameter is multiplied by a mask.

``mask`` is any tensor broadcastable to the parameter: per unit (``[out, 1]`` / ``[1, in]``,
the soft masks of DAS/TSS) or per entry (TaLoS, WSN). An entry with mask 0 neither moves nor
decays; with mask ``m`` it moves ``m`` times as far as the unmasked optimizer would move it.

Masking the *update* rather than the gradient is what makes soft masks hold under Adam(W): Adam
divides each coordinate by its own running gradient scale, so a constant factor on the gradient
cancels. The mask is fused into the step: no parameter-sized snapshot is taken.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim import SGD, Adam, AdamW, Optimizer

__all__ = ["MaskedAdamW", "MaskedSGD", "masked_adamw_step", "masked_sgd_step", "install_update_masks", "UpdateMaskHandle"]

MaskDict = dict  # Parameter -> Tensor (broadcastable); keyed by the parameter object


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def masked_adamw_step(optimizer: Optimizer, masks: MaskDict, decoupled: bool = True) -> None:
    """One Adam/AdamW step over ``optimizer.param_groups`` with update masks; state keys match torch's."""
    for group in optimizer.param_groups:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr = float(lr)
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("masked Adam does not support sparse gradients")
            state = optimizer.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad if decoupled or wd == 0 else p.grad.add(p, alpha=wd))
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(float(state["step"]))
        if not params:
            continue
        torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - b2)
        # Params of one group almost always share a step count; bucket by it to use foreach kernels.
        buckets: dict[float, list[int]] = {}
        for i, s in enumerate(steps):
            buckets.setdefault(s, []).append(i)
        for step, idx in buckets.items():
            bc1 = 1 - b1**step
            bc2_sqrt = math.sqrt(1 - b2**step)
            ps = [params[i] for i in idx]
            upd = torch._foreach_sqrt([exp_avg_sqs[i] for i in idx])
            torch._foreach_div_(upd, bc2_sqrt)
            torch._foreach_add_(upd, eps)
            torch._foreach_reciprocal_(upd)
            torch._foreach_mul_(upd, [exp_avgs[i] for i in idx])
            torch._foreach_mul_(upd, lr / bc1)
            if wd != 0 and decoupled:
                torch._foreach_add_(upd, ps, alpha=lr * wd)
            for p, u in zip(ps, upd):
                m = masks.get(p)
                if m is not None:
                    u.mul_(m)
            torch._foreach_sub_(ps, upd)
            del upd


@torch.no_grad()
def masked_sgd_step(optimizer: Optimizer, masks: MaskDict) -> None:
    """SGD (momentum, dampening, nesterov, weight decay) with update masks.

    Momentum of entries whose mask is exactly 0 is zeroed too, so a frozen entry carries no
    velocity into a later phase (the SparseSGDM behaviour TaLoS relies on).
    """
    for group in optimizer.param_groups:
        lr, mom, damp, wd, nesterov = group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            m = masks.get(p)
            if mom != 0:
                state = optimizer.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d_p.detach().clone()
                else:
                    buf.mul_(mom).add_(d_p, alpha=1 - damp)
                if m is not None:
                    buf.masked_fill_(m == 0, 0)
                d_p = d_p.add(buf, alpha=mom) if nesterov else buf
            upd = d_p * lr
            if m is not None:
                upd.mul_(m)
            p.sub_(upd)


class _MaskMixin:
    update_masks: MaskDict

    def set_update_masks(self, masks: MaskDict | None) -> None:
        """Masks keyed by parameter; ``None`` or ``{}`` makes this the plain optimizer."""
        self.update_masks = dict(masks or {})


class MaskedAdamW(_MaskMixin, AdamW):
    """``torch.optim.AdamW`` with per-parameter update masks (same state dict, same hyper-parameters)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, update_masks: MaskDict | None = None, **kwargs):
        for unsupported in ("amsgrad", "maximize", "capturable", "differentiable"):
            if kwargs.get(unsupported):
                raise ValueError(f"MaskedAdamW does not support {unsupported}=True")
        kwargs.pop("fused", None)
        kwargs.pop("foreach", None)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.set_update_masks(update_masks)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masked_adamw_step(self, self.update_masks)
        return loss


class MaskedSGD(_MaskMixin, SGD):
    """``torch.optim.SGD`` with per-parameter update masks; frozen entries' momentum is masked too."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, update_masks: MaskDict | None = None, **kwargs):
        kwargs.pop("fused", None)
        kwargs.pop("foreach", None)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, **kwargs)
        self.set_update_masks(update_masks)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masked_sgd_step(self, self.update_masks)
        return loss


class UpdateMaskHandle:
    """Returned by :func:`install_update_masks`; ``remove()`` restores the optimizer's own step."""

    def __init__(self, optimizer: Optimizer, original_step, masks: MaskDict, how: str):
        self.optimizer = optimizer
        self._original = original_step
        self.masks = masks
        self.how = how

    def update(self, masks: MaskDict) -> None:
        self.masks.clear()
        self.masks.update(masks)

    def remove(self) -> None:
        if self._original is not None:
            if self._original is _CLASS_STEP:
                self.optimizer.__dict__.pop("step", None)
            else:
                self.optimizer.step = self._original
            self._original = None


_CLASS_STEP = object()


def _fusable(opt: Optimizer) -> str | None:
    if isinstance(opt, (MaskedAdamW, MaskedSGD)):
        return "native"
    d = opt.defaults
    if type(opt) in (AdamW, Adam) and not any(d.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable")):
        return "adamw" if type(opt) is AdamW or d.get("decoupled_weight_decay") else "adam"
    if type(opt) is SGD and not any(d.get(k) for k in ("maximize", "differentiable")):
        return "sgd"
    return None


def install_update_masks(optimizer, masks: MaskDict) -> UpdateMaskHandle:
    """Make ``optimizer`` (torch or accelerate-wrapped) apply ``masks`` to its updates.

    AdamW, Adam and SGD get the mask fused into their step (state dict unchanged, so checkpoints
    stay compatible). Any other optimizer falls back to snapshotting the masked parameters before
    its step and interpolating ``old + m * (new - old)`` after it (exact, but one extra copy).
    """
    opt = _unwrap(optimizer)
    masks = dict(masks)
    kind = _fusable(opt)
    if kind == "native":
        opt.set_update_masks(masks)
        handle = UpdateMaskHandle(opt, None, opt.update_masks, "native")
        return handle

    original = opt.__dict__.get("step", _CLASS_STEP)
    handle = UpdateMaskHandle(opt, original, masks, kind or "snapshot")

    if kind in ("adamw", "adam"):
        def compute(closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            masked_adamw_step(opt, handle.masks, decoupled=(kind == "adamw"))
            return loss
    elif kind == "sgd":
        def compute(closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            masked_sgd_step(opt, handle.masks)
            return loss
    else:
        inner_step = opt.step

        def compute(closure=None):
            with torch.no_grad():
                snap = {p: p.detach().clone() for p in handle.masks if p.grad is not None}
            loss = inner_step(closure) if closure is not None else inner_step()
            with torch.no_grad():
                for p, old in snap.items():
                    p.copy_(old.lerp_(p, handle.masks[p].to(old.dtype).expand_as(old)))
            return loss

    def step(closure=None):
        # LR schedulers check this flag to verify optimizer.step ran before scheduler.step.
        opt._opt_called = True
        return compute(closure)

    step._wrapped_by_lr_sched = True
    opt.step = step
    return handle


def param_masks_to_device(masks: MaskDict) -> MaskDict:
    """Move each mask to its parameter's device (dtype float32 for bf16-safe multiplies)."""
    return {p: m.to(device=p.device, dtype=p.dtype if p.dtype.is_floating_point else torch.float32) for p, m in masks.items()}

