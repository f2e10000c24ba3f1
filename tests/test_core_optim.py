"""Masked optimizers: equal to torch's without masks, exact freezing with masks, compatible state."""

import copy

import pytest
import torch

from hf_softmask import MaskedAdamW, MaskedSGD, install_update_masks


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 5, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def _run(opt_factory, masks_fn=None, steps=5, install=False):
    params = _params()
    opt = opt_factory(params)
    if masks_fn is not None:
        masks = masks_fn(params)
        if install:
            install_update_masks(opt, masks)
        else:
            opt.set_update_masks(masks)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_masked_adamw_without_masks_matches_torch_adamw(wd):
    ours, _ = _run(lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=wd))
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=wd))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_zero_mask_entries_neither_move_nor_decay_and_half_mask_moves_half():
    init = [p.detach().clone() for p in _params()]
    row_mask = torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 0.0]).view(6, 1)
    params, _ = _run(lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1), lambda ps: {ps[0]: row_mask})
    free, _ = _run(lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1), steps=1)
    assert torch.equal(params[0][0], init[0][0]) and torch.equal(params[0][5], init[0][5])
    assert not torch.equal(params[0][1], init[0][1])
    one_masked, _ = _run(lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1), lambda ps: {ps[0]: row_mask}, steps=1)
    torch.testing.assert_close(one_masked[0][2] - init[0][2], 0.5 * (free[0][2] - init[0][2]))


def test_install_on_plain_adamw_is_exact_and_state_dict_stays_compatible():
    mask = lambda ps: {ps[0]: torch.zeros(1, 5)}  # noqa: E731
    params, opt = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), mask, install=True)
    assert torch.equal(params[0], _params()[0])
    ours, _ = _run(lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1), mask)
    torch.testing.assert_close(params[1], ours[1])
    fresh = torch.optim.AdamW(_params(), lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[fresh.param_groups[0]["params"][1]]["step"].item() == 5


def test_snapshot_fallback_for_other_optimizers():
    init = _params()
    mask = {0: torch.tensor(0.0), 1: torch.tensor(0.25)}
    params, opt = _run(
        lambda ps: torch.optim.Adagrad(ps, lr=0.1), lambda ps: {ps[0]: mask[0], ps[1]: mask[1]}, steps=1, install=True
    )
    free, _ = _run(lambda ps: torch.optim.Adagrad(ps, lr=0.1), steps=1)
    assert torch.equal(params[0], init[0])
    torch.testing.assert_close(params[1] - init[1], 0.25 * (free[1] - init[1]))


def test_masked_sgd_momentum_of_frozen_entries_is_zeroed():
    entry_mask = torch.ones(6, 5)
    entry_mask[2, 3] = 0
    params, opt = _run(
        lambda ps: MaskedSGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1), lambda ps: {ps[0]: entry_mask}
    )
    assert torch.equal(params[0][2, 3], _params()[0][2, 3])
    assert opt.state[params[0]]["momentum_buffer"][2, 3] == 0
    ref, _ = _run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1))
    torch.testing.assert_close(params[1], ref[1])


def test_masked_adamw_rejects_options_it_does_not_implement():
    with pytest.raises(ValueError, match="amsgrad"):
        MaskedAdamW(_params(), amsgrad=True)


_HOOKED_OPTIMIZERS = {
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adagrad_snapshot": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "masked_adamw": lambda ps: MaskedAdamW(ps, lr=1e-2),
}


@pytest.mark.parametrize("kind", sorted(_HOOKED_OPTIMIZERS))
def test_step_hooks_keep_firing_with_update_masks(kind):
    """register_step_pre_hook / post_hook.

    The pre-hook sees the gradients before the update, the post-hook after it.
    """
    params = _params()
    opt = _HOOKED_OPTIMIZERS[kind](params)
    seen = []

    def pre(o, args, kwargs):
        seen.append(("pre", params[0].detach().clone(), params[0].grad is not None))

    def post(o, args, kwargs):
        seen.append(("post", params[0].detach().clone(), params[0].grad is not None))

    opt.register_step_pre_hook(pre)
    handle = install_update_masks(opt, {params[0]: torch.tensor([0.0, 1, 1, 1, 1, 1]).view(6, 1)})
    opt.register_step_post_hook(post)
    init = params[0].detach().clone()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert [s[0] for s in seen] == ["pre", "post"], seen
    assert torch.equal(seen[0][1], init) and seen[0][2]
    assert not torch.equal(seen[1][1][1:], init[1:]) and seen[1][2]  # post-hook: updated, gradients still there
    assert torch.equal(params[0][0], init[0])  # and masked
    handle.remove()
    opt.step()
    assert len(seen) == 4 and not torch.equal(params[0][0], init[0])  # removed: the plain step again


@pytest.mark.parametrize("kind", ["adamw_foreach", "adamw_fused", "sgd"])
def test_state_dict_round_trip_and_zero_grad_after_masked_steps(kind):
    params = _params()
    opt = _HOOKED_OPTIMIZERS[kind](params)
    install_update_masks(opt, {params[0]: torch.zeros(6, 1)})
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in params)
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = _HOOKED_OPTIMIZERS[kind](fresh_params)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would alias the tensors
    for p, q in zip(params, fresh_params):
        for k, v in opt.state[p].items():
            torch.testing.assert_close(fresh.state[q][k], v)
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()  # masked: params[0] frozen
    fresh.step()  # unmasked torch step continues from the masked run's state
    assert torch.equal(params[0], _params()[0]) and not torch.equal(fresh_params[0], params[0])
    torch.testing.assert_close(fresh_params[1], params[1])


def test_second_install_on_one_optimizer_is_refused():
    params = _params()
    opt = torch.optim.AdamW(params)
    handle = install_update_masks(opt, {params[0]: torch.zeros(())})
    with pytest.raises(RuntimeError, match="already"):
        install_update_masks(opt, {params[1]: torch.zeros(())})
    handle.remove()
    install_update_masks(opt, {params[1]: torch.zeros(())}).remove()


def test_eager_step_in_chunks_equals_one_pass(monkeypatch):
    """The eager step computes Adam's denominator chunk by chunk (on the CPU, 4M elements: temporaries that reuse
    each other's memory); chunks of one tensor, of several, and a single chunk must give the same step."""
    from hf_softmask.core import optim

    def run(limit):
        monkeypatch.setattr(optim, "_CHUNK_ELEMENTS", {"cpu": limit})
        g = torch.Generator().manual_seed(0)
        shapes = [(6, 5), (5,), (2, 2), (3,), (4, 3)]
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        masks = {params[0]: torch.rand(6, 1, generator=g), params[2]: torch.rand(2, 2, generator=g)}
        opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, update_masks=masks)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params

    one_pass = run(1 << 30)
    for limit in (1, 8, 40):  # every tensor alone; (5,) alone and (2,2)+(3,) together; mixed
        for a, b in zip(run(limit), one_pass):
            assert torch.equal(a, b), limit
