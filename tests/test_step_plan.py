"""The compiled masked AdamW step's plan (hf_softmask.core.step_plan): reused between steps, rebuilt whenever what it
was built from changes, and then equal, bit for bit, to a step gathered afresh.

The update runs uncompiled here (the same function torch.compile would compile), so that the plan's own logic is what
is tested without tens of seconds of compiling; the compiled kernel is checked against torch's fused AdamW in
test_amp_masking and test_distributed_masking.
"""

import copy

import pytest
import torch

from hf_softmask.core import optim
from hf_softmask.core.step_plan import PLAN_ATTR


@pytest.fixture
def eager_update(monkeypatch):
    monkeypatch.setattr(optim, "_COMPILED_UPDATE", optim._adamw_update_lists)


def _model():
    g = torch.Generator().manual_seed(0)
    shapes = {"rows": (6, 5), "cols": (5, 6), "bias": (5,), "entries": (4, 4), "idle": (3,)}
    return {k: torch.nn.Parameter(torch.randn(s, generator=g)) for k, s in shapes.items()}


def _masks(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        params["rows"]: torch.rand(6, 1, generator=g),  # per output unit
        params["cols"]: torch.rand(1, 6, generator=g),  # per input unit
        params["entries"]: (torch.rand(4, 4, generator=g) > 0.5).float(),  # per entry (TaLoS/WSN)
    }


def _backward(params, g, skip=(), scaler=None):
    """Gradients of a random linear loss (scaled by ``scaler``); none for "idle" and ``skip``."""
    for p in params.values():
        p.grad = None
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() for k, p in params.items() if k not in (*skip, "idle"))
    (loss if scaler is None else scaler.scale(loss)).backward()


def _scenario(kind: str, fresh_every_step: bool):
    """Steps through everything that must make a plan rebuild; ``fresh_every_step`` drops the plan before each
    step (a new one is gathered, reading the step counts from the state), the reference. ``kind``: masks installed
    on torch's fused AdamW (step hooks) or a MaskedAdamW (its own step: a parameter the plan left out is not
    stepped by anything else)."""
    params = _model()
    opt = (torch.optim.AdamW if kind == "installed" else optim.MaskedAdamW)(
        [
            {"params": [params["rows"], params["cols"], params["entries"]], "weight_decay": 0.1},
            {"params": [params["bias"], params["idle"]], "weight_decay": 0.0, "lr": 3e-3},
        ],
        lr=1e-2,
        fused=True,
    )
    handle = optim.install_update_masks(opt, _masks(params, 1), compiled=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(2)
    plans = []

    def step(skip=(), scaled=False, inf=False):
        if fresh_every_step:
            opt.__dict__.pop(PLAN_ATTR, None)
        _backward(params, g, skip, scaler if scaled else None)
        if scaled:
            if inf:
                params["bias"].grad[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        plans.append(opt.__dict__.get(PLAN_ATTR))

    for lr in (1e-2, 5e-3, 2e-3):  # a scheduler's new learning rate each step
        opt.param_groups[0]["lr"] = lr
        step()
    saved = copy.deepcopy(opt.state_dict())
    step()
    opt.load_state_dict(saved)  # new state, step counts back by one
    step()
    step(scaled=True)
    step(scaled=True, inf=True)  # skipped: nothing moves, no count advances
    step(scaled=True)
    handle.update(_masks(params, 3))  # the masks of a new domain
    step()
    step(skip=("cols",))  # a parameter without a gradient this step
    step()  # ... and with one again
    opt.state[params["rows"]]["exp_avg"] = torch.zeros_like(params["rows"])  # a state tensor replaced by hand
    step()
    opt.state[params["bias"]] = {}  # a parameter's state dropped: it starts again at step 1
    step()
    handle.remove()
    step()  # torch's own fused step moves the step counts...
    handle = optim.install_update_masks(opt, _masks(params, 3), compiled=True)
    step()  # ... which the next masked step reads
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "weight_decay": 0.0})
    params["extra"] = extra
    step()
    step()
    return params, opt, plans


@pytest.mark.parametrize("kind", ["installed", "native"])
def test_plan_steps_equal_fresh_gathers_through_every_change(eager_update, kind):
    got, got_opt, plans = _scenario(kind, fresh_every_step=False)
    ref, ref_opt, _ = _scenario(kind, fresh_every_step=True)
    for name, p in ref.items():
        assert torch.equal(got[name], p), name
        s_got, s_ref = got_opt.state[got[name]], ref_opt.state[p]
        assert s_got.keys() == s_ref.keys(), name
        for key, value in s_ref.items():
            assert torch.equal(s_got[key], value), (name, key)
    assert got_opt.state[got["rows"]]["step"].item() == 15
    assert got_opt.state[got["bias"]]["step"].item() == 5  # its state was dropped before the 13th step
    assert not got_opt.state.get(got["idle"])  # never had a gradient
    # the plan was kept between ordinary steps (else the comparison above says nothing about it) ...
    assert plans[1] is plans[0] and plans[2] is plans[0]
    # ... and rebuilt after each change (load_state_dict, new masks, a missing gradient, a replaced state tensor, a
    # dropped state, re-installing, a new group)
    assert len({id(p) for p in plans if p is not None}) >= 9


def test_a_plan_is_not_kept_for_the_eager_step_and_the_eager_step_drops_one(eager_update):
    params = _model()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, fused=True)
    handle = optim.install_update_masks(opt, _masks(params, 1), compiled=True)
    g = torch.Generator().manual_seed(2)
    _backward(params, g)
    opt.step()
    assert opt.__dict__.get(PLAN_ATTR) is not None
    handle.compiled = False  # e.g. after a compile error: the eager step runs and advances the counts itself
    _backward(params, g)
    opt.step()
    assert opt.__dict__.get(PLAN_ATTR) is None
    handle.compiled = True
    _backward(params, g)
    opt.step()  # a new plan reads count 2 from the state: the bias correction of step 3
    assert opt.state[params["rows"]]["step"].item() == 3
    assert opt.__dict__[PLAN_ATTR].parts[0].buckets == [[0, 3.0]]
    handle.remove()  # a removed handle leaves no plan holding the optimizer's tensors
    assert opt.__dict__.get(PLAN_ATTR) is None


class _KernelFailure(Exception):
    """Stands for a compile error on a later step (e.g. a recompile for a new dtype)."""


@pytest.mark.parametrize("kind", ["installed", "native"])
def test_a_compiled_step_failing_after_the_plan_was_built_steps_eagerly_once(eager_update, monkeypatch, kind):
    """The hook path runs the plan's update in the post-hook: a failure there must fall back to one eager step
    (not none, not two) and say so."""
    out = []
    for fail in (False, True):
        params = _model()
        opt = (torch.optim.AdamW if kind == "installed" else optim.MaskedAdamW)(
            list(params.values()), lr=1e-2, fused=True
        )
        handle = optim.install_update_masks(opt, _masks(params, 1), compiled=True)
        g = torch.Generator().manual_seed(2)
        _backward(params, g)
        opt.step()  # builds the plan
        _backward(params, g)
        if fail:

            def broken(*args):
                raise _KernelFailure("no kernel")

            monkeypatch.setattr(optim, "_COMPILED_UPDATE", broken)
            monkeypatch.setattr(optim, "_COMPILE_WARNED", set())  # warned once per process and error type
            with pytest.warns(RuntimeWarning, match="_KernelFailure"):
                opt.step()
            assert "_KernelFailure" in opt.__dict__["_hf_softmask_compile_error"]
            assert opt.__dict__.get(PLAN_ATTR) is None
        else:
            if kind == "installed":
                handle.compiled = False
            else:
                opt.compiled = False
            opt.step()  # the eager step
        assert all(p.grad is not None for k, p in params.items() if k != "idle")  # gradients given back
        out.append((params, opt))
    (ref, ref_opt), (got, got_opt) = out
    for name, p in ref.items():
        assert torch.equal(got[name], p), name
        for key, value in ref_opt.state[p].items():
            assert torch.equal(got_opt.state[got[name]][key], value), (name, key)
    assert got_opt.state[got["rows"]]["step"].item() == 2


def test_the_device_path_of_the_hyper_rows_gives_the_same_steps(eager_update, monkeypatch):
    """Off the CPU each step builds its hyper-parameter rows in a fresh host buffer (the copy to the device is
    asynchronous) instead of writing one buffer in place; here that path runs on the CPU and must step the same."""
    from hf_softmask.core import step_plan

    ref, ref_opt, _ = _scenario("installed", fresh_every_step=False)
    init = step_plan._Part.__init__

    def as_on_a_device(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.buffer = self.hyper = None

    monkeypatch.setattr(step_plan._Part, "__init__", as_on_a_device)
    got, got_opt, plans = _scenario("installed", fresh_every_step=False)
    assert all(part.buffer is None for plan in plans if plan is not None for part in plan.parts)
    for name, p in ref.items():
        assert torch.equal(got[name], p), name
