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

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = None

__all__ = ["MaskedAdamW", "MaskedSGD", "masked_adamw_step", "masked_sgd_step", "install_update_masks", "UpdateMaskHandle", "local_mask"]

MaskDict = dict  # Parameter -> Tensor (broadcastable); keyed by the parameter object


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    # AcceleratedOptimizer subclasses torch's Optimizer, so unwrap by the attribute, not by the type.
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _is_dtensor(t) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias: in-place ops on it update the DTensor), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def local_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` (broadcastable to the full ``param``) restricted to this process's shard of ``param``.

    A plain parameter gets ``mask`` unchanged. For a DTensor parameter (FSDP2), every mesh dimension that
    shards a tensor dimension along which the mask varies takes the matching chunk of the mask; dimensions
    where the mask broadcasts (size 1) stay whole. No communication: every rank holds the same full mask.
    """
    if not _is_dtensor(param) or mask.dim() == 0:
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


class _LocalMasks:
    """Masks keyed by parameter, cut to each parameter's local shard once and reused while unchanged."""

    def __init__(self):
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _entry(self, masks: MaskDict, p: torch.Tensor):
        m = masks.get(p)
        if m is None:
            return None
        hit = self._cache.get(id(p))
        if hit is None or hit[0] is not m:
            local = local_mask(m, p)
            target = _local(p)
            if local.device != target.device:
                local = local.to(target.device)
            # Per-unit (broadcast) masks are small: keep them in the parameter's dtype and in fp32. A per-entry
            # mask (TaLoS, WSN) is parameter-sized: keep it as given, never a second parameter-sized copy.
            small = local.numel() < target.numel()
            if small and local.dtype != target.dtype and target.dtype.is_floating_point:
                local = local.to(target.dtype)
            hit = self._cache[id(p)] = (m, local, local.float() if small else None)
        return hit

    def get(self, masks: MaskDict, p: torch.Tensor) -> torch.Tensor | None:
        """The local mask on the parameter's device (in its dtype when per-unit)."""
        hit = self._entry(masks, p)
        return None if hit is None else hit[1]

    def get_float(self, masks: MaskDict, p: torch.Tensor) -> torch.Tensor | None:
        """The local mask in float32 (for factors like ``1 - lr*wd*m`` that bf16 would round to 1)."""
        hit = self._entry(masks, p)
        if hit is None:
            return None
        return hit[2] if hit[2] is not None else hit[1].float()


def _local_masks(optimizer: Optimizer) -> _LocalMasks:
    cache = optimizer.__dict__.get("_hf_softmask_local_masks")
    if cache is None:
        cache = optimizer.__dict__["_hf_softmask_local_masks"] = _LocalMasks()
    return cache


# Elements per chunk of the temporary ``denom`` buffer: bounds the step's extra memory (torch's foreach AdamW
# allocates it for all parameters at once) without adding kernel launches for typical layer sizes.
_CHUNK_ELEMENTS = 1 << 27


def _chunks(idx: list[int], sizes: list[int]):
    chunk, n = [], 0
    for i in idx:
        if chunk and n + sizes[i] > _CHUNK_ELEMENTS:
            yield chunk
            chunk, n = [], 0
        chunk.append(i)
        n += sizes[i]
    if chunk:
        yield chunk


def _adamw_update_lists(params, grads, exp_avgs, exp_avg_sqs, masks, hp, decoupled: bool):
    """The whole masked Adam(W) update of lists of tensors, written per element for torch.compile to fuse.

    ``hp`` = [lr, beta1, beta2, eps, weight_decay, bias_correction1, sqrt(bias_correction2)] as a tensor, so a
    new learning rate does not recompile. Math in fp32, results cast back to each tensor's dtype.
    """
    lr, b1, b2, eps, wd, bc1, bc2_sqrt = (hp[i] for i in range(7))
    for p, g, m, v, k in zip(params, grads, exp_avgs, exp_avg_sqs, masks):
        pf, gf = p.float(), g.float()
        if not decoupled:
            gf = gf + wd * pf
        mf = m.float().lerp(gf, 1 - b1)
        vf = v.float() * b2 + (1 - b2) * gf * gf
        upd = (mf / bc1) / (vf.sqrt() / bc2_sqrt + eps)
        if decoupled:
            upd = upd + wd * pf
        m.copy_(mf)
        v.copy_(vf)
        p.copy_(pf - lr * k * upd)


_COMPILED_UPDATE = None


def _compiled_update():
    global _COMPILED_UPDATE
    if _COMPILED_UPDATE is None:
        _COMPILED_UPDATE = torch.compile(_adamw_update_lists, dynamic=False)
    return _COMPILED_UPDATE


@torch.no_grad()
def masked_adamw_step(optimizer: Optimizer, masks: MaskDict, decoupled: bool = True, compiled: bool = False) -> None:
    """One Adam/AdamW step over ``optimizer.param_groups`` with update masks; state keys match torch's.

    Works on local tensors, so DTensor (FSDP2) parameters, gradients and states are updated shard by shard
    with the matching shard of each mask. The per-unit masks enter as ``p *= 1 - lr*wd*m`` and as a
    division of Adam's denominator by ``m`` (``m = 0`` gives an infinite denominator, hence exactly no
    step): no parameter-sized buffer beyond the denominator torch's own foreach AdamW uses.

    ``compiled=True`` runs the update through ``torch.compile`` instead: one fused pass over each tensor
    (as fast as torch's fused AdamW, no temporary buffer); the first step compiles (tens of seconds).
    """
    local_masks = _local_masks(optimizer)
    for group in optimizer.param_groups:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr = float(lr)
        params, grads, exp_avgs, exp_avg_sqs, step_ts, pmasks, fmasks = [], [], [], [], [], [], []
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
            pl = _local(p)
            params.append(pl)
            grads.append(_local(p.grad))
            exp_avgs.append(_local(state["exp_avg"]))
            exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            step_ts.append(state["step"])
            pmasks.append(local_masks.get(masks, p))
            fmasks.append(local_masks.get_float(masks, p) if compiled or (wd != 0 and decoupled) else None)
        if not params:
            continue
        torch._foreach_add_(step_ts, 1)
        if compiled:
            _compiled_group_step(params, grads, exp_avgs, exp_avg_sqs, step_ts, fmasks, (lr, b1, b2, eps, wd), decoupled)
            continue
        if wd != 0 and not decoupled:
            grads = torch._foreach_add(grads, params, alpha=wd)  # L2-regularised Adam
        torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - b2)
        del grads
        sizes = [t.numel() for t in params]
        # Params of one group almost always share a step count; bucket by it to use foreach kernels.
        buckets: dict[float, list[int]] = {}
        for i, s in enumerate(step_ts):
            buckets.setdefault(float(s), []).append(i)
        for step, idx in buckets.items():
            bc1 = 1 - b1**step
            bc2_sqrt = math.sqrt(1 - b2**step)
            # ea/(sqrt(v)/bc2_sqrt + eps) == bc2_sqrt * ea/(sqrt(v) + eps*bc2_sqrt): one pass fewer.
            step_size = lr * bc2_sqrt / bc1
            if wd != 0 and decoupled:
                plain = [params[i] for i in idx if pmasks[i] is None]
                if plain:
                    torch._foreach_mul_(plain, 1 - lr * wd)
                masked = [i for i in idx if pmasks[i] is not None]
                if masked:
                    # 1 - lr*wd*m per unit (small tensors), in fp32 so that bf16 does not round it to 1.
                    decay = torch._foreach_mul([fmasks[i] for i in masked], -(lr * wd))
                    torch._foreach_add_(decay, 1.0)
                    torch._foreach_mul_([params[i] for i in masked], decay)
            for chunk in _chunks(idx, sizes):
                denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in chunk])
                torch._foreach_add_(denom, eps * bc2_sqrt)
                masked = [k for k, i in enumerate(chunk) if pmasks[i] is not None]
                if masked:
                    torch._foreach_div_([denom[k] for k in masked], [pmasks[chunk[k]] for k in masked])
                torch._foreach_addcdiv_([params[i] for i in chunk], [exp_avgs[i] for i in chunk], denom, -step_size)
                del denom


def _compiled_group_step(params, grads, exp_avgs, exp_avg_sqs, step_ts, fmasks, hyper, decoupled: bool) -> None:
    lr, b1, b2, eps, wd = hyper
    buckets: dict[tuple, list[int]] = {}  # by step count and device: one compiled call each
    for i, s in enumerate(step_ts):
        buckets.setdefault((float(s), params[i].device), []).append(i)
    for (step, device), idx in buckets.items():
        hp = torch.tensor([lr, b1, b2, eps, wd, 1 - b1**step, math.sqrt(1 - b2**step)], dtype=torch.float32)
        # A pageable host-to-device copy would wait for the queued backward; pinned + non_blocking does not.
        hp = hp.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hp.to(device)
        ones = torch.ones((), dtype=torch.float32, device=device)
        _compiled_update()([params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                           [exp_avg_sqs[i] for i in idx], [ones if fmasks[i] is None else fmasks[i] for i in idx], hp, decoupled)


@torch.no_grad()
def masked_sgd_step(optimizer: Optimizer, masks: MaskDict) -> None:
    """SGD (momentum, dampening, nesterov, weight decay) with update masks.

    Momentum of entries whose mask is exactly 0 is zeroed too, so a frozen entry carries no
    velocity into a later phase (the SparseSGDM behaviour TaLoS relies on). DTensor parameters are
    updated shard by shard, like :func:`masked_adamw_step`.
    """
    local_masks = _local_masks(optimizer)
    for group in optimizer.param_groups:
        lr, mom, damp, wd, nesterov = group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
        for p in group["params"]:
            if p.grad is None:
                continue
            pl, g = _local(p), _local(p.grad)
            d_p = g if wd == 0 else g.add(pl, alpha=wd)
            m = local_masks.get(masks, p)
            if mom != 0:
                state = optimizer.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d_p.detach().clone() if not _is_dtensor(p) else torch.zeros_like(p)
                    if _is_dtensor(p):
                        _local(buf).copy_(d_p)
                else:
                    _local(buf).mul_(mom).add_(d_p, alpha=1 - damp)
                bl = _local(buf)
                if m is not None:
                    bl.masked_fill_(m == 0, 0)
                d_p = d_p.add(bl, alpha=mom) if nesterov else bl
            upd = d_p * lr
            if m is not None:
                upd.mul_(m)
            pl.sub_(upd)


class _MaskMixin:
    update_masks: MaskDict

    def set_update_masks(self, masks: MaskDict | None) -> None:
        """Masks keyed by parameter; ``None`` or ``{}`` makes this the plain optimizer."""
        self.update_masks = dict(masks or {})

    def _masked_update(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._masked_update()
        return loss


class MaskedAdamW(_MaskMixin, AdamW):
    """``torch.optim.AdamW`` with per-parameter update masks (same state dict, same hyper-parameters)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, update_masks: MaskDict | None = None,
                 compile: bool = False, **kwargs):
        for unsupported in ("amsgrad", "maximize", "capturable", "differentiable"):
            if kwargs.get(unsupported):
                raise ValueError(f"MaskedAdamW does not support {unsupported}=True")
        kwargs.pop("fused", None)
        kwargs.pop("foreach", None)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.set_update_masks(update_masks)
        self.compiled = bool(compile)  # torch.compile the update into one fused pass (see masked_adamw_step)

    def _masked_update(self) -> None:
        masked_adamw_step(self, self.update_masks, compiled=self.compiled)


class MaskedSGD(_MaskMixin, SGD):
    """``torch.optim.SGD`` with per-parameter update masks; frozen entries' momentum is masked too."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, update_masks: MaskDict | None = None, **kwargs):
        kwargs.pop("fused", None)
        kwargs.pop("foreach", None)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, **kwargs)
        self.set_update_masks(update_masks)

    def _masked_update(self) -> None:
        masked_sgd_step(self, self.update_masks)


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
        if self.how == "native":
            self.optimizer.set_update_masks(None)
            return
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


def install_update_masks(optimizer, masks: MaskDict, compiled: bool = False) -> UpdateMaskHandle:
    """Make ``optimizer`` (torch or accelerate-wrapped) apply ``masks`` to its updates.

    ``compiled=True``: the Adam/AdamW update runs through ``torch.compile`` (one fused pass per tensor).

    AdamW, Adam and SGD get the mask fused into their step (state dict unchanged, so checkpoints
    stay compatible). Any other optimizer falls back to snapshotting the masked parameters before
    its step and interpolating ``old + m * (new - old)`` after it (exact, but one extra copy).
    """
    opt = _unwrap(optimizer)
    masks = dict(masks)
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    if masks and not any(id(p) in optimized for p in masks):
        # E.g. DeepSpeed or FSDP1 step flat copies of the parameters: masks keyed by the model's
        # parameters would silently mask nothing.
        raise ValueError(
            f"none of the {len(masks)} masked parameters is among the parameters {type(opt).__name__} updates; "
            "build the masks from the model the optimizer was created for (after accelerate.prepare). Optimizers "
            "that step flat parameter copies (DeepSpeed ZeRO, FSDP1) cannot take update masks: use FSDP2 or grad mode."
        )
    kind = _fusable(opt)
    if kind == "native":
        opt.set_update_masks(masks)
        if compiled and isinstance(opt, MaskedAdamW):
            opt.compiled = True
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
            masked_adamw_step(opt, handle.masks, decoupled=(kind == "adamw"), compiled=compiled)
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
        local_masks = _local_masks(opt)

        def compute(closure=None):
            with torch.no_grad():
                snap = {p: _local(p).detach().clone() for p in handle.masks if p.grad is not None}
            loss = inner_step(closure) if closure is not None else inner_step()
            with torch.no_grad():
                for p, old in snap.items():
                    pl = _local(p)
                    pl.copy_(old.lerp_(pl, local_masks.get(handle.masks, p).to(old.dtype).expand_as(old)))
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

