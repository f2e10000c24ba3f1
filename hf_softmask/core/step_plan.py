"""The host side of the compiled masked AdamW step, gathered once and reused while it holds.

Gathering a step's tensors costs host time per tensor: state lookups hash each parameter in Python, masks are looked
up, every 0-d step count is read. For the 39 tensors of a 10M-parameter Llama this was ~0.5 ms of a ~7 ms compiled
step on the 2-core CPU (2026-12-07), most of the gap to torch's fused AdamW. A :class:`StepPlan` gathers once. Each
step checks by identity that nothing it was built from was replaced: the optimizer's state, its groups and their
parameters, each parameter's state tensors, the masks dict and its entries, which parameters have gradients. The
plan holds references to all of these, so an id cannot be reused while it lives. It keeps a host copy of the step
counts, which only the plan advances while it lives: no 0-d tensor is read on the host (on a GPU, no sync).

Not seen: a step count changed *in place* by other code (in-place changes to moments or parameters, as CBP's resets
make, are the plan's own tensors and need nothing; ``load_state_dict`` replaces the state and is seen). Whoever steps
the optimizer without the plan must drop it (:func:`drop_plan`); ``optim`` does so.
"""

from __future__ import annotations

import array
import functools
import itertools
import math
import operator

import torch

__all__ = ["PartlyStepped", "StepPlan", "drop_plan", "fold_hyper", "group_hyper", "raise_partly_stepped"]

PLAN_ATTR = "_hf_softmask_step_plan"

_grad_of = operator.attrgetter("grad")
_is_none = functools.partial(operator.is_, None)
_STATE_GETTERS = tuple(operator.itemgetter(k) for k in ("exp_avg", "exp_avg_sq", "step"))


def fold_hyper(hp, step: float, decoupled: bool, inv_scale: float) -> list[float]:
    """One row of the compiled update's ``hyper`` (see ``optim._adamw_update_lists``) for hyper-parameters
    ``hp = (lr, beta1, beta2, eps, weight_decay)`` on the step that takes the count from ``step`` to ``step + 1``;
    folded on the host in float64, like torch's own step."""
    lr, b1, b2, eps, wd = hp
    bc2_sqrt = math.sqrt(1 - b2 ** (step + 1))
    return [
        1 - b1,
        b2,
        1 - b2,
        lr * bc2_sqrt / (1 - b1 ** (step + 1)),
        eps * bc2_sqrt,
        wd * lr if decoupled else wd,
        inv_scale,
    ]


def group_hyper(group) -> tuple:
    """(lr, beta1, beta2, eps, weight_decay) of a param group, as ``fold_hyper`` takes them."""
    return (float(group["lr"]), *group["betas"], group["eps"], group["weight_decay"])


def _all_params(groups):
    return itertools.chain.from_iterable(g["params"] for g in groups)


class PartlyStepped(RuntimeError):
    """A compiled step failed on one device after it had updated another: the eager fallback would step those twice."""


def raise_partly_stepped(err: Exception, n: int, device) -> None:
    """Re-raise ``err``, raised by the ``n``-th device's compiled update of one step; as :class:`PartlyStepped` when
    an earlier device was already updated."""
    if n == 0 or isinstance(err, torch.OutOfMemoryError):
        raise err
    raise PartlyStepped(
        f"the compiled masked AdamW step failed on {device} after it had updated the parameters on "
        f"{n} other device(s); the optimizer is part-stepped ({type(err).__name__}: {err})"
    ) from err


def drop_plan(optimizer) -> None:
    """Forget ``optimizer``'s plan (its step counts are about to move without it)."""
    optimizer.__dict__.pop(PLAN_ATTR, None)


class _Part:
    """The tensors of one device, in the order the compiled update takes them."""

    def __init__(self, device, index, owners, states, kmasks, group_of, ones):
        self.device = device
        self.index = index  # positions of this part's tensors among the plan's owners
        self.params = [owners[i] for i in index]
        self.exp_avgs = [states[i]["exp_avg"] for i in index]
        self.exp_avg_sqs = [states[i]["exp_avg_sq"] for i in index]
        self.steps = [states[i]["step"] for i in index]
        self.kmasks = [ones if kmasks[i] is None else kmasks[i] for i in index]
        # Step counts on the parameters' device advance inside the compiled call (one launch fewer); CPU step
        # counts of device parameters (a non-fused optimizer) after it.
        self.inside = all(s.device == device for s in self.steps)
        # One hyper row per (group, step count): [group index, host step count]; rows[i] = bucket of tensor i.
        # Reading the counts here is the plan's only host read of them (one sync on a GPU, once per plan).
        buckets: dict[tuple[int, float], int] = {}
        rows = []
        for i, s in zip(index, torch.stack([s.to(device) for s in self.steps]).tolist()):
            rows.append(buckets.setdefault((group_of[i], s), len(buckets)))
        self.buckets = [list(k) for k in buckets]
        self.rows = rows
        # CPU parameters read the hyper rows from one buffer written in place each step: new tensors (or numpy
        # arrays) cost more host time than the whole rest of the step once the update has streamed the caches cold.
        # A device copy needs a fresh host buffer each step (the copy is asynchronous).
        self.buffer = array.array("f", bytes(4 * 7 * len(rows))) if device.type == "cpu" else None
        self.hyper = None if self.buffer is None else torch.frombuffer(self.buffer, dtype=torch.float32).view(-1, 7)


class StepPlan:
    """Everything the compiled masked AdamW step of one (non-DTensor) optimizer passes on, built from one gather."""

    def __init__(self, optimizer, masks: dict, owners: list, kmasks: list, decoupled: bool):
        """``owners``: the parameters stepped (all that have a gradient, in group order); ``kmasks``: their kernel
        masks (None for unmasked). States must exist."""
        groups = optimizer.param_groups
        self.decoupled = decoupled
        self.state, self.groups, self.masks = optimizer.state, groups, masks
        self.owners = owners
        self.owner_states = [self.state[p] for p in owners]
        # Everything the fingerprint names is held here (or by the parts), so no id in it can be reused.
        self.held = list(self._identities(self.state, groups, masks))
        self.fingerprint = list(map(id, self.held))
        owner_ids = set(map(id, owners))
        self.idle = [p for p in _all_params(groups) if id(p) not in owner_ids]
        group_index = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        group_of = [group_index[id(p)] for p in owners]
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(owners):
            by_device.setdefault(p.device, []).append(i)
        self.parts = [
            _Part(d, idx, owners, self.owner_states, kmasks, group_of, torch.ones((), dtype=torch.float32, device=d))
            for d, idx in by_device.items()
        ]
        self.single = len(self.parts) == 1

    def _identities(self, state, groups, masks):
        """The objects the plan was built from: the optimizer's state and groups, every parameter, the masks and
        their entries, every parameter's state dict, the stepped parameters' state tensors."""
        return itertools.chain(
            (state, groups, masks),
            _all_params(groups),
            masks,
            masks.values(),
            state.values(),
            *(map(get, self.owner_states) for get in _STATE_GETTERS),
        )

    def holds(self, optimizer, masks: dict, decoupled: bool) -> bool:
        """Whether nothing the plan was built from has been replaced (one list of ids, built by C-level maps)."""
        return (
            decoupled == self.decoupled
            and list(map(id, self._identities(optimizer.state, optimizer.param_groups, masks))) == self.fingerprint
        )

    def grads(self) -> list | None:
        """The owners' gradients, or None if the set of parameters with a gradient changed."""
        grads = list(map(_grad_of, self.owners))
        if any(map(_is_none, grads)) or not all(map(_is_none, map(_grad_of, self.idle))):
            return None
        return grads

    def run(self, update, grads: list, inv_scale: float | None, to_device) -> None:
        """One step: ``update`` is the compiled ``_adamw_update_lists``; step counts advance only after it ran."""
        hps = [group_hyper(g) for g in self.groups]
        inv = 1.0 if inv_scale is None else inv_scale
        for n, part in enumerate(self.parts):
            folded = [fold_hyper(hps[gi], s, self.decoupled, inv) for gi, s in part.buckets]
            values = array.array("f", itertools.chain.from_iterable(map(folded.__getitem__, part.rows)))
            if part.buffer is not None:
                part.buffer[:] = values
                hyper = part.hyper
            else:
                hyper = to_device(torch.frombuffer(values, dtype=torch.float32).view(-1, 7), part.device)
            try:
                update(
                    part.params,
                    grads if self.single else [grads[i] for i in part.index],
                    part.exp_avgs,
                    part.exp_avg_sqs,
                    part.kmasks,
                    hyper,
                    self.decoupled,
                    part.steps if part.inside else None,
                )
            except Exception as err:
                raise_partly_stepped(err, n, part.device)
            if not part.inside:
                torch._foreach_add_(part.steps, 1)
            for b in part.buckets:
                b[1] += 1
