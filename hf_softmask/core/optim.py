"""Optimizers whose whole update of a parameter is multiplied by a mask.

``mask`` is any tensor broadcastable to the parameter: per unit (``[out, 1]`` / ``[1, in]``,
the soft masks of DAS/TSS) or per entry (TaLoS, WSN). An entry with mask 0 neither moves nor
decays; with mask ``m`` it moves ``m`` times as far as the unmasked optimizer would move it.

Masking the *update* rather than the gradient is what makes soft masks hold under Adam(W): Adam
divides each coordinate by its own running gradient scale, so a constant factor on the gradient
cancels. The mask is fused into the step: no parameter-sized snapshot is taken.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.optim import SGD, Adam, AdamW, Optimizer

from .dtensor import LocalMasks, is_dtensor, local_mask, local_tensor
from .step_plan import PLAN_ATTR, PartlyStepped, StepPlan, drop_plan, fold_hyper, group_hyper, raise_partly_stepped

__all__ = [
    "AUTO_COMPILE_AFTER_STEPS",
    "AUTO_COMPILE_MIN_ELEMENTS",
    "MaskedAdamW",
    "MaskedSGD",
    "UpdateMaskHandle",
    "compile_available",
    "install_update_masks",
    "local_mask",
    "local_masks_of",
    "masked_adamw_step",
    "masked_sgd_step",
    "resolve_compiled",
    "unwrap_optimizer",
    "update_masks_of",
]

MaskDict = dict  # Parameter -> Tensor (broadcastable); keyed by the parameter object


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    # AcceleratedOptimizer subclasses torch's Optimizer, so unwrap by the attribute, not by the type.
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def local_masks_of(optimizer: Optimizer) -> LocalMasks:
    """The :class:`~hf_softmask.core.dtensor.LocalMasks` cache kept on ``optimizer`` (created on first use)."""
    cache = optimizer.__dict__.get("_hf_softmask_local_masks")
    if cache is None:
        cache = optimizer.__dict__["_hf_softmask_local_masks"] = LocalMasks()
    return cache


# Elements per chunk of the temporary ``denom`` buffer: bounds the step's extra memory (torch's foreach AdamW
# allocates it for all parameters at once) without adding kernel launches for typical layer sizes. On the CPU
# smaller: tens of MB of temporaries freed at the end of a step are handed back to the OS by glibc and mapped in
# afresh (page faults) the next step, while 16 MB chunks reuse each other's memory. 10M-parameter Llama, 2-core
# CPU, 2026-12-07: 3,052 page faults and 1.14x torch's foreach step per step with one chunk, 0 and 0.83x so.
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_DEFAULT = 1 << 27

#: ``compiled="auto"`` compiles the masked update only for optimizers holding at least this many elements:
#: below it the eager step costs milliseconds, less than compiling (tens of seconds) ever wins back.
AUTO_COMPILE_MIN_ELEMENTS = 1 << 20
#: ... and only from this masked step on: short runs (smoke tests, a few steps) never pay for compiling.
AUTO_COMPILE_AFTER_STEPS = 50


def _chunks(idx: list[int], sizes: list[int], device: torch.device):
    limit = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_DEFAULT)
    chunk, n = [], 0
    for i in idx:
        if chunk and n + sizes[i] > limit:
            yield chunk
            chunk, n = [], 0
        chunk.append(i)
        n += sizes[i]
    if chunk:
        yield chunk


def _amp_inputs(optimizer: Optimizer) -> tuple[bool, float | None]:
    """(skip, inverse grad scale) from a GradScaler driving an optimizer that declares ``_step_supports_amp_scaling``.

    Such an optimizer gets still-scaled gradients plus ``optimizer.grad_scale`` (None once ``unscale_`` ran, e.g.
    for clipping) and ``optimizer.found_inf``; a step with an inf/NaN gradient must change nothing. One host sync.
    """
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf):
        return True, None
    scale = getattr(optimizer, "grad_scale", None)
    return False, (None if scale is None else 1.0 / float(scale))


def _new_step(optimizer: Optimizer, p: torch.Tensor) -> torch.Tensor:
    # Where torch keeps it: on the parameter's device for fused/capturable AdamW, else a CPU scalar.
    d = optimizer.defaults
    on_device = d.get("fused") or d.get("capturable")
    return (
        torch.zeros((), dtype=torch.float32, device=p.device) if on_device else torch.tensor(0.0, dtype=torch.float32)
    )


def _adamw_update_lists(params, grads, exp_avgs, exp_avg_sqs, masks, hyper, decoupled: bool, steps=None):
    """The whole masked Adam(W) update of lists of tensors, written per element for torch.compile to fuse.

    ``hyper[i]`` = [1 - beta1, beta2, 1 - beta2, lr * sqrt(bc2) / bc1, eps * sqrt(bc2), weight decay (times lr
    when decoupled), 1/grad_scale] of tensor ``i`` (bc = bias correction): a tensor, so a new learning rate or
    step does not recompile. The scalars are folded on the host so that each element costs one square root, one
    division and a few multiply-adds, as in torch's fused kernel; the per-unit mask ``k`` enters only through
    per-unit factors. Math in fp32, results cast back to each tensor's dtype. ``steps`` (optional): step counts
    to advance by one in the same call.
    """
    for i, (p, g, m, v, k) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, masks)):
        c1, b2, c2, step_size, eps, wd, inv_scale = (hyper[i, j] for j in range(7))
        pf, gf = p.float(), g.float() * inv_scale
        if not decoupled:
            gf = gf + wd * pf  # L2-regularised Adam
        # m + (1-b1)*(g - m), not m*b1 + g*(1-b1): with the latter inductor materialises the moments in a loop of
        # its own (flat, while the masked update loops per unit) and the step takes two passes instead of one; nor
        # lerp, whose per-element branch made the pass 6-9 % slower than torch's fused kernel (idle 2-core CPU,
        # 10M and 135M parameters, 2026-12-07).
        mf = m.float()
        mf = mf + c1 * (gf - mf)
        vf = v.float() * b2 + c2 * gf * gf
        if decoupled:
            pf = pf * (1 - k * wd)  # masked decay: 1 - lr*wd*k per unit
        m.copy_(mf)
        v.copy_(vf)
        p.copy_(pf - (k * step_size) * mf / (vf.sqrt() + eps))
    for s in steps or ():
        s.add_(1)


_COMPILED_UPDATE = None
_COMPILE_WARNED: set[str] = set()


def _compiled_update():
    global _COMPILED_UPDATE
    if _COMPILED_UPDATE is None:
        # No size/stride asserts in the compiled wrapper: ~5 us per tensor per step, and dynamo's guards already
        # recompile for other shapes or strides.
        _COMPILED_UPDATE = torch.compile(
            _adamw_update_lists, dynamic=False, options={"size_asserts": False, "alignment_asserts": False}
        )
    return _COMPILED_UPDATE


def compile_available(device: torch.device) -> str | None:
    """None when torch.compile can build the masked update on ``device``, else the reason it cannot."""
    import shutil

    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    if device.type == "cpu":
        import os

        cxx = os.environ.get("CXX")
        return (
            None
            if (cxx and shutil.which(cxx)) or any(shutil.which(c) for c in ("g++", "c++", "clang++"))
            else "no C++ compiler"
        )
    return f"no tested torch.compile backend for {device.type}"


def _warn_once(key: str, message: str) -> None:
    import warnings

    if key not in _COMPILE_WARNED:
        _COMPILE_WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_compiled(optimizer: Optimizer, compiled: bool | str) -> bool:
    """The ``compiled`` setting of a masked Adam/AdamW step: ``"auto"`` compiles when the user's optimizer is
    fused (so a plain step would be torch's one-pass kernel), holds >= AUTO_COMPILE_MIN_ELEMENTS elements, and
    torch.compile works on its device; otherwise the eager foreach step (a warning says why when fused).
    With ``"auto"`` the first AUTO_COMPILE_AFTER_STEPS steps still run eagerly (see :func:`compile_after`)."""
    if compiled != "auto":
        if compiled not in (True, False):
            raise ValueError(f"compiled must be True, False or 'auto', got {compiled!r}")
        return compiled
    if not optimizer.defaults.get("fused"):
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params or sum(p.numel() for p in params) < AUTO_COMPILE_MIN_ELEMENTS:
        return False
    reason = compile_available(params[0].device)
    if reason is not None:
        _warn_once(
            f"auto:{reason}",
            f"update masks on a fused optimizer: torch.compile is unavailable ({reason}); using the "
            "eager masked step, several times slower than torch's fused AdamW step",
        )
        return False
    return True


def compile_after(compiled: bool | str) -> int:
    """Masked steps run eagerly before the compiled update takes over: AUTO_COMPILE_AFTER_STEPS for ``"auto"``."""
    return AUTO_COMPILE_AFTER_STEPS if compiled == "auto" else 0


def masked_adamw_step(
    optimizer: Optimizer, masks: MaskDict, decoupled: bool = True, compiled: bool = False, after: int = 0
) -> None:
    """One Adam/AdamW step over ``optimizer.param_groups`` with update masks; state keys match torch's.

    Works on local tensors, so DTensor (FSDP2) parameters, gradients and states are updated shard by shard
    with the matching shard of each mask. The per-unit masks enter as ``p *= 1 - lr*wd*m`` and as a
    division of Adam's denominator by ``m`` (``m = 0`` gives an infinite denominator, hence exactly no
    step): no parameter-sized buffer beyond the denominator torch's own foreach AdamW uses.

    ``compiled=True`` runs the update through ``torch.compile`` instead: one fused pass over each tensor
    (as fast as torch's fused AdamW, no temporary buffer); the first step compiles (tens of seconds). If
    compiling fails, a warning names the error and the eager step runs. ``after``: the number of masked steps
    of this optimizer that still run eagerly.

    Under a GradScaler (``optimizer.grad_scale`` / ``found_inf``, set for optimizers that declare
    ``_step_supports_amp_scaling``), gradients are unscaled and a step with an inf gradient changes nothing.
    """
    _masked_adamw_step(optimizer, masks, decoupled, compiled, after)


@torch.no_grad()
def _masked_adamw_step(
    optimizer: Optimizer, masks: MaskDict, decoupled: bool, compiled: bool, after: int, defer: bool = False
):
    """:func:`masked_adamw_step`; with ``defer``, a step from the plan is returned as (params, grads, run) for the
    caller to ``run()`` later, all its host work but the update itself done: ``params`` are then all the parameters
    that have a gradient. Every other step runs at once and returns None."""
    skip, inv_scale = _amp_inputs(optimizer)
    if skip:
        return None
    state = optimizer.__dict__
    if compiled and _COMPILE_ERROR not in state:
        planned = _plan_step(optimizer, masks, decoupled, inv_scale)
        if planned is not None:
            if defer:
                return planned
            planned[2]()
            return None
    local_masks = local_masks_of(optimizer)
    lists = _gather(optimizer)
    if not lists:
        return None
    done = state.get("_hf_softmask_masked_steps", 0)
    state["_hf_softmask_masked_steps"] = done + 1
    if compiled and done >= after and _COMPILE_ERROR not in state:
        step = functools.partial(_compiled_step, optimizer, lists, masks, local_masks, decoupled, inv_scale)
        if _try_compiled(optimizer, step):
            return None
    drop_plan(optimizer)  # the eager step advances the step counts the plan mirrors
    for group, params, grads, exp_avgs, exp_avg_sqs, step_ts, owners in lists:
        _foreach_group_step(
            group,
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            step_ts,
            [local_masks.get(masks, p) for p in owners],
            [local_masks.get_float(masks, p) for p in owners],
            decoupled,
            inv_scale,
        )
    return None


def _gather(optimizer: Optimizer) -> list:
    """Per group with gradients: (group, params, grads, exp_avgs, exp_avg_sqs, steps, owners), local tensors of
    DTensors (``owners``: the parameters themselves); creates missing state as torch's AdamW does."""
    lists = []
    for group in optimizer.param_groups:
        params, grads, exp_avgs, exp_avg_sqs, step_ts, owners = [], [], [], [], [], []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("masked Adam does not support sparse gradients")
            state = optimizer.state[p]
            if len(state) == 0:
                state["step"] = _new_step(optimizer, p)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if is_dtensor(p):
                params.append(p.to_local())
                grads.append(local_tensor(g))
                exp_avgs.append(local_tensor(state["exp_avg"]))
                exp_avg_sqs.append(local_tensor(state["exp_avg_sq"]))
            else:
                params.append(p)
                grads.append(g)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            step_ts.append(state["step"])
            owners.append(p)
        if params:
            lists.append((group, params, grads, exp_avgs, exp_avg_sqs, step_ts, owners))
    return lists


_COMPILE_ERROR = "_hf_softmask_compile_error"


def _try_compiled(optimizer: Optimizer, step: Callable[[], None]) -> bool:
    """Run a compiled step; on failure (no compiler, unsupported op/backend) record and warn once, and return False
    so that the eager step (exact, only slower) runs instead."""
    try:
        step()
        return True
    except Exception as err:
        if isinstance(err, (torch.OutOfMemoryError, PartlyStepped)):
            raise
        drop_plan(optimizer)
        optimizer.__dict__[_COMPILE_ERROR] = f"{type(err).__name__}: {err}"
        _warn_once(
            f"fail:{type(err).__name__}",
            f"compiling the masked AdamW update failed ({type(err).__name__}: "
            f"{str(err)[:200]}); using the eager masked step",
        )
        return False


def _plan_step(optimizer: Optimizer, masks: MaskDict, decoupled: bool, inv_scale: float | None):
    """(the parameters to step, their gradients, a callable that steps them) from the optimizer's
    :class:`StepPlan`, if it has one that still holds; else None, and the plan is dropped."""
    plan = optimizer.__dict__.get(PLAN_ATTR)
    if plan is None:
        return None
    grads = plan.grads() if plan.holds(optimizer, masks, decoupled) else None
    if grads is None:
        drop_plan(optimizer)
        return None
    return plan.owners, grads, functools.partial(_run_plan, optimizer, plan, grads, inv_scale, masks, decoupled)


@torch.no_grad()
def _run_plan(optimizer, plan: StepPlan, grads, inv_scale, masks: MaskDict, decoupled: bool) -> None:
    if not _try_compiled(optimizer, functools.partial(plan.run, _compiled_update(), grads, inv_scale, _to_device)):
        _masked_adamw_step(optimizer, masks, decoupled, compiled=False, after=0)  # the eager step: exact, slower


def _foreach_group_step(
    group, params, grads, exp_avgs, exp_avg_sqs, step_ts, pmasks, fmasks, decoupled, inv_scale
) -> None:
    lr, (b1, b2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
    if inv_scale is not None:
        torch._foreach_mul_(grads, inv_scale)  # what GradScaler.unscale_ does for non-fused optimizers
    if wd != 0 and not decoupled:
        grads = torch._foreach_add(grads, params, alpha=wd)  # L2-regularised Adam
    torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - b2)
    del grads
    torch._foreach_add_(step_ts, 1)
    sizes = [t.numel() for t in params]
    # Params of one group almost always share a step count; bucket by it to use foreach kernels (one host read).
    buckets: dict[float, list[int]] = {}
    for i, s in enumerate(torch.stack(step_ts).tolist()):
        buckets.setdefault(s, []).append(i)
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
        for chunk in _chunks(idx, sizes, params[0].device):
            denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in chunk])
            torch._foreach_add_(denom, eps * bc2_sqrt)
            masked = [k for k, i in enumerate(chunk) if pmasks[i] is not None]
            if masked:
                torch._foreach_div_([denom[k] for k in masked], [pmasks[chunk[k]] for k in masked])
            torch._foreach_addcdiv_([params[i] for i in chunk], [exp_avgs[i] for i in chunk], denom, -step_size)
            del denom


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A pageable host-to-device copy would wait for the queued backward; pinned + non_blocking does not.
    if t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _compiled_step(
    optimizer: Optimizer, lists, masks: MaskDict, local_masks: LocalMasks, decoupled: bool, inv_scale: float | None
) -> None:
    """All groups in one compiled call per device; steps are advanced only after the update succeeded.

    Without DTensors the step is made through a :class:`StepPlan` kept for the next steps; DTensor (FSDP2) local
    shards are gathered anew each step (FSDP2 may swap a parameter's local tensor)."""
    owners = [p for *_, group_owners in lists for p in group_owners]
    if not any(map(is_dtensor, owners)):
        plan = StepPlan(optimizer, masks, owners, [local_masks.get_kernel(masks, p) for p in owners], decoupled)
        optimizer.__dict__[PLAN_ATTR] = plan
        plan.run(_compiled_update(), [g for _, _, grads, *_ in lists for g in grads], inv_scale, _to_device)
        return
    by_device: dict[torch.device, list] = {}
    for group, params, grads, exp_avgs, exp_avg_sqs, step_ts, group_owners in lists:
        hp = group_hyper(group)
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(
                (p, grads[i], exp_avgs[i], exp_avg_sqs[i], step_ts[i], group_owners[i], hp)
            )
    inv = 1.0 if inv_scale is None else inv_scale
    for n, (device, rows) in enumerate(by_device.items()):
        steps = [r[4] for r in rows]
        if all(s.device.type == "cpu" for s in steps):  # torch's default: fold on the host, in float64 like torch
            hyper = torch.tensor(
                [fold_hyper(r[6], s, decoupled, inv) for r, s in zip(rows, torch.stack(steps).tolist())],
                dtype=torch.float32,
            )
        else:  # fused/capturable AdamW keeps steps on the device: fold there, with no host sync
            lr, b1, b2, eps, wd = _to_device(torch.tensor([r[6] for r in rows], dtype=torch.float64), device).unbind(1)
            n_next = torch.stack([s.to(device) for s in steps]).double() + 1
            bc2_sqrt = (1 - b2**n_next).sqrt()
            hyper = torch.stack(
                [
                    1 - b1,
                    b2,
                    1 - b2,
                    lr * bc2_sqrt / (1 - b1**n_next),
                    eps * bc2_sqrt,
                    wd * lr if decoupled else wd,
                    torch.full_like(lr, inv),
                ],
                1,
            ).float()
        hyper = _to_device(hyper, device)
        ones = torch.ones((), dtype=torch.float32, device=device)
        kmasks = [local_masks.get_kernel(masks, r[5]) for r in rows]
        # Step counts on the parameters' device advance inside the compiled call (one launch fewer); CPU step
        # counts of device parameters (a non-fused optimizer) after it.
        inside = all(s.device == device for s in steps)
        try:
            _compiled_update()(
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                [ones if k is None else k for k in kmasks],
                hyper,
                decoupled,
                steps if inside else None,
            )
        except Exception as err:
            raise_partly_stepped(err, n, device)
        if not inside:
            torch._foreach_add_(steps, 1)


@torch.no_grad()
def masked_sgd_step(optimizer: Optimizer, masks: MaskDict) -> None:
    """SGD (momentum, dampening, nesterov, weight decay) with update masks.

    Momentum of entries whose mask is exactly 0 is zeroed too, so a frozen entry carries no
    velocity into a later phase (the SparseSGDM behaviour TaLoS relies on). DTensor parameters are
    updated shard by shard, like :func:`masked_adamw_step`, and a GradScaler is honoured the same way.
    """
    skip, inv_scale = _amp_inputs(optimizer)
    if skip:
        return
    local_masks = local_masks_of(optimizer)
    for group in optimizer.param_groups:
        lr, mom, damp, wd, nesterov = (
            group["lr"],
            group["momentum"],
            group["dampening"],
            group["weight_decay"],
            group["nesterov"],
        )
        for p in group["params"]:
            if p.grad is None:
                continue
            pl, g = local_tensor(p), local_tensor(p.grad)
            if inv_scale is not None:
                g = g * inv_scale
            d_p = g if wd == 0 else g.add(pl, alpha=wd)
            m = local_masks.get(masks, p)
            if mom != 0:
                state = optimizer.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d_p.detach().clone() if not is_dtensor(p) else torch.zeros_like(p)
                    if is_dtensor(p):
                        local_tensor(buf).copy_(d_p)
                else:
                    local_tensor(buf).mul_(mom).add_(d_p, alpha=1 - damp)
                bl = local_tensor(buf)
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
    """``torch.optim.AdamW`` with per-parameter update masks (same state dict, same hyper-parameters).

    ``fused=True`` declares GradScaler support like torch's fused AdamW (the scaler hands over
    ``grad_scale``/``found_inf``) and, with ``compile="auto"``, runs the update compiled into one pass
    (see :func:`resolve_compiled`).
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        update_masks: MaskDict | None = None,
        compile: bool | str = "auto",
        **kwargs,
    ):
        for unsupported in ("amsgrad", "maximize", "capturable", "differentiable"):
            if kwargs.get(unsupported):
                raise ValueError(f"MaskedAdamW does not support {unsupported}=True")
        kwargs.pop("foreach", None)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.set_update_masks(update_masks)
        self.compiled = resolve_compiled(self, compile)  # torch.compile the update into one fused pass
        self.compile_after = compile_after(compile)

    def _masked_update(self) -> None:
        masked_adamw_step(self, self.update_masks, compiled=self.compiled, after=self.compile_after)


class MaskedSGD(_MaskMixin, SGD):
    """``torch.optim.SGD`` with per-parameter update masks; frozen entries' momentum is masked too."""

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        update_masks: MaskDict | None = None,
        **kwargs,
    ):
        kwargs.pop("foreach", None)
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            **kwargs,
        )
        self.set_update_masks(update_masks)

    def _masked_update(self) -> None:
        masked_sgd_step(self, self.update_masks)


_HANDLE_ATTR = "_hf_softmask_update_mask_handle"


class UpdateMaskHandle:
    """Returned by :func:`install_update_masks`; ``remove()`` makes the optimizer plain again.

    The masking lives in step hooks of the inner optimizer, which torch runs from the class's ``step``
    however it is reached (a bound method captured by accelerate's AcceleratedOptimizer, a GradScaler, an
    LR scheduler's wrapper): nothing is installed on ``optimizer.step``, so nothing can overwrite it.
    """

    def __init__(self, optimizer: Optimizer, masks: MaskDict, how: str, compiled: bool = False, after: int = 0):
        self.optimizer = optimizer
        self.masks = masks
        self.how = how
        self.compiled = compiled
        self.compile_after = after
        self._hooks: list = []
        self._hidden: tuple[list, list] = ([], [])  # parameters whose gradients the class's step must not see
        self._snapshot: dict = {}
        self._updated = False
        self._pending = None  # a prepared compiled step, run by the post-hook

    def update(self, masks: MaskDict) -> None:
        self.masks.clear()
        self.masks.update(masks)

    def remove(self) -> None:
        drop_plan(self.optimizer)  # the class's own step moves the step counts from here on
        if self.how == "native":
            self.optimizer.set_update_masks(None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.optimizer.__dict__.get(_HANDLE_ATTR) is self:
            del self.optimizer.__dict__[_HANDLE_ATTR]

    # -- fused kinds: the masked update runs inside the optimizer's own step, via its closure --------------------
    def _pre_fused(self, opt, args, kwargs):
        """Hand the class's step a closure that runs the user's closure, then the masked update, then hides the
        gradients so the class's own update finds nothing to do. The step calls it after all pre-hooks ran, in
        whatever order they were registered. A compiled step from a plan runs in the post-hook instead, after the
        gradients are back, so that the host work around it (hiding and restoring gradients, the class's own
        empty step) runs before the update streams the caches cold (~0.1 ms a step for 39 tensors on the 2-core
        CPU)."""
        args, kwargs = tuple(args), dict(kwargs)
        closure = kwargs.pop("closure", None)
        if len(args) > 1:
            closure, args = args[1], args[:1]
        self._updated = False
        self._pending = None
        self._first_post_hook(opt)

        def masked_closure():
            loss = closure() if closure is not None else None
            stepped = self._update()  # (params, grads, pending update) from a plan: no second scan
            if stepped is None:  # stepped already (eager, SGD, DTensors): hide whatever has a gradient
                with_grad = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                stepped = with_grad, [p.grad for p in with_grad], None
            params, grads, self._pending = stepped
            self._hidden = params, grads
            for p in params:
                p.grad = None
            self._updated = True
            return loss

        kwargs["closure"] = masked_closure
        return args, kwargs

    def _update(self):
        if self.how == "sgd":
            return masked_sgd_step(self.optimizer, self.masks)
        return _masked_adamw_step(
            self.optimizer, self.masks, self.how == "adamw", self.compiled, self.compile_after, defer=True
        )

    def _post_fused(self, opt, args, kwargs) -> None:
        for p, g in zip(*self._hidden):
            p.grad = g
        self._hidden = ([], [])
        if not self._updated:
            raise RuntimeError(
                f"{type(opt).__name__}.step did not call its closure, so the update masks were not applied"
            )
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    # -- any other optimizer: snapshot the masked parameters, step, interpolate -------------------------------
    @torch.no_grad()
    def _pre_snapshot(self, opt, args, kwargs) -> None:
        self._first_post_hook(opt)
        self._snapshot = {p: local_tensor(p).detach().clone() for p in self.masks if p.grad is not None}

    @torch.no_grad()
    def _post_snapshot(self, opt, args, kwargs) -> None:
        local_masks = local_masks_of(opt)
        for p, old in self._snapshot.items():
            pl = local_tensor(p)
            pl.copy_(old.lerp_(pl, local_masks.get(self.masks, p).to(old.dtype).expand_as(old)))
        self._snapshot = {}

    def _first_post_hook(self, opt) -> None:
        # Post-hooks registered later must see the masked result (and the gradients back): ours runs first.
        post = self._hooks[1]
        opt._optimizer_step_post_hooks.move_to_end(post.id, last=False)


def _fusable(opt: Optimizer) -> str | None:
    if isinstance(opt, (MaskedAdamW, MaskedSGD)):
        return "native"
    d = opt.defaults
    if type(opt) in (AdamW, Adam) and not any(
        d.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable")
    ):
        return "adamw" if type(opt) is AdamW or d.get("decoupled_weight_decay") else "adam"
    if type(opt) is SGD and not any(d.get(k) for k in ("maximize", "differentiable")):
        return "sgd"
    return None


def update_masks_of(optimizer) -> MaskDict | None:
    """The update masks ``optimizer`` (torch or accelerate-wrapped) applies: those of :func:`install_update_masks`
    or of a :class:`MaskedAdamW`/:class:`MaskedSGD`; None when it has none."""
    opt = unwrap_optimizer(optimizer)
    handle = opt.__dict__.get(_HANDLE_ATTR)
    if handle is not None:
        return handle.masks
    return getattr(opt, "update_masks", None) if isinstance(opt, _MaskMixin) else None


def install_update_masks(optimizer, masks: MaskDict, compiled: bool | str = "auto") -> UpdateMaskHandle:
    """Make ``optimizer`` (torch or accelerate-wrapped) apply ``masks`` to its updates.

    AdamW, Adam and SGD get the mask fused into their step (state dict unchanged, so checkpoints
    stay compatible). Any other optimizer falls back to snapshotting the masked parameters before
    its step and interpolating ``old + m * (new - old)`` after it (exact, but one extra copy).

    ``compiled``: the Adam/AdamW update runs through ``torch.compile`` (one fused pass per tensor); ``"auto"``
    (default) does so when the optimizer is fused and big, after AUTO_COMPILE_AFTER_STEPS eager steps (see
    :func:`resolve_compiled`).

    The masking is installed as step hooks of the inner optimizer (see :class:`UpdateMaskHandle`), so user step
    hooks keep firing and accelerate's GradScaler path cannot replace it. One set of masks per optimizer.
    """
    opt = unwrap_optimizer(optimizer)
    previous = opt.__dict__.get(_HANDLE_ATTR)
    if previous is not None:
        raise RuntimeError(
            f"{type(opt).__name__} already has update masks installed; remove() their handle first "
            "(or install the product of both mask sets)"
        )
    drop_plan(opt)  # steps taken without masks since an earlier plan moved its step counts
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
        if compiled != "auto" and isinstance(opt, MaskedAdamW):
            opt.compiled, opt.compile_after = resolve_compiled(opt, compiled), compile_after(compiled)
        handle = UpdateMaskHandle(opt, opt.update_masks, "native")
    elif kind is not None:
        use_compiled = resolve_compiled(opt, compiled) if kind in ("adamw", "adam") else False
        handle = UpdateMaskHandle(opt, masks, kind, compiled=use_compiled, after=compile_after(compiled))
        handle._hooks = [
            opt.register_step_pre_hook(handle._pre_fused),
            opt.register_step_post_hook(handle._post_fused),
        ]
    else:
        handle = UpdateMaskHandle(opt, masks, "snapshot")
        handle._hooks = [
            opt.register_step_pre_hook(handle._pre_snapshot),
            opt.register_step_post_hook(handle._post_snapshot),
        ]
    opt.__dict__[_HANDLE_ATTR] = handle
    return handle
