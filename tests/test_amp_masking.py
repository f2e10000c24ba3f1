"""Update masks under mixed-precision machinery: accelerate's AcceleratedOptimizer with a GradScaler, fused
AdamW driven by a GradScaler (grad_scale / found_inf), and a real Trainer whose accelerator scales the loss.

``torch.amp.GradScaler("cpu")`` stands in for CUDA's scaler: same code path (loss scaling, ``unscale_``,
``found_inf``, ``grad_scale`` handed to fused optimizers), only on the CPU.
"""

import pytest
import torch

from hf_softmask import (
    MaskedAdamW,
    SoftMaskCallback,
    SoftMaskConfig,
    SoftMasker,
    UnitLayout,
    install_update_masks,
)
from tests.test_core_masking import _args, _one_hot_importance, _unit_slice
from tests.testing_utils import ExampleDataset, random_lm_batches, tiny_llama


def _protected(layout):
    return [_unit_slice(s, layout, 2, 5, 1, 0) for s in layout.owned]


def _assert_protected_unchanged(layout, before):
    checked = 0
    for s, b in zip(layout.owned, before):
        if b is not None:
            assert torch.equal(_unit_slice(s, layout, 2, 5, 1, 0), b), f"{s.name}: protected slice moved"
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("fused", [False, True])
def test_update_masks_hold_through_accelerated_optimizer_with_grad_scaler(fused):
    """AcceleratedOptimizer re-patches optimizer.step on every scaled step; the masks must survive that.

    accelerate makes no GradScaler on a CPU, so the Accelerator is handed ``GradScaler("cpu")`` before
    ``prepare``: prepare() wraps the optimizer with it and ``accelerator.backward`` scales the loss.
    """
    from accelerate import Accelerator

    model = tiny_llama(seed=0)
    layout = UnitLayout.from_model(model)
    before = _protected(layout)
    free_before = [_unit_slice(s, layout, 0, 9, 1, 0) for s in layout.owned]
    accelerator = Accelerator(cpu=True)
    scaler = accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused, foreach=not fused)
    model, wrapped = accelerator.prepare(model, opt)
    assert type(wrapped).__name__ == "AcceleratedOptimizer" and wrapped.scaler is scaler
    masker = SoftMasker(model, _one_hot_importance(layout), SoftMaskConfig(mode="update")).attach(wrapped)
    for batch in random_lm_batches(n_batches=3, seed=4):
        accelerator.backward(model(**batch).loss)
        wrapped.step()
        wrapped.zero_grad()
    assert not wrapped.step_was_skipped and opt.state[next(model.parameters())]["step"].item() == 3
    assert scaler._get_growth_tracker() == 3  # the scaler drove every step
    _assert_protected_unchanged(layout, before)
    moved = [
        not torch.equal(_unit_slice(s, layout, 0, 9, 1, 0), b)
        for s, b in zip(layout.owned, free_before)
        if b is not None
    ]
    assert all(moved[:2]), "unprotected units did not train"
    masker.detach()


def _model_and_params(seed=0):
    model = tiny_llama(seed=seed)
    return model, list(model.parameters())


def _scaled_steps(opt, model, scaler, n_steps, inf_at=None):
    for i, batch in enumerate(random_lm_batches(n_batches=n_steps, seed=5)):
        scaler.scale(model(**batch).loss).backward()
        if i == inf_at:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def test_fused_adamw_under_grad_scaler_unscales_and_skips_inf_steps():
    """Fused AdamW tells the scaler it unscales by itself: the masked step must honour grad_scale and found_inf.

    Reference: torch's own fused AdamW with the same scaler. Moments must be in unscaled units, and the
    step with an inf gradient must change nothing (parameters, moments, step count).
    """
    results = {}
    for name in ("torch", "masked"):
        model, params = _model_and_params()
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        if name == "masked":
            install_update_masks(opt, {}, compiled=False)  # no masks: must equal torch's step exactly
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
        _scaled_steps(opt, model, scaler, n_steps=4, inf_at=2)
        results[name] = (model, opt, scaler)
    (ref, ref_opt, ref_scaler), (got, got_opt, got_scaler) = results["torch"], results["masked"]
    assert ref_scaler.get_scale() == got_scaler.get_scale() == 2.0**13  # one inf step halved the scale
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
        s_ref, s_got = ref_opt.state[p], got_opt.state[q]
        assert s_got["step"].item() == s_ref["step"].item() == 3  # the inf step was skipped, state included
        torch.testing.assert_close(s_got["exp_avg"], s_ref["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(s_got["exp_avg_sq"], s_ref["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_inf_step_under_grad_scaler_leaves_masked_parameters_and_state_untouched():
    model, params = _model_and_params()
    layout = UnitLayout.from_model(model)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    SoftMasker(model, _one_hot_importance(layout), SoftMaskConfig(mode="update")).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    _scaled_steps(opt, model, scaler, n_steps=1)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    _scaled_steps(opt, model, scaler, n_steps=1, inf_at=0)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), snap[n]), n
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[n][k]), (n, k)


def test_masked_adamw_native_fused_flag_under_grad_scaler_matches_torch():
    """MaskedAdamW(fused=True) declares amp support like torch's fused AdamW and handles the scaler itself."""
    out = []
    for cls in (torch.optim.AdamW, MaskedAdamW):
        model, params = _model_and_params()
        opt = cls(params, lr=1e-2, weight_decay=0.1, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
        _scaled_steps(opt, model, scaler, n_steps=3, inf_at=1)
        out.append(model)
    for p, q in zip(out[0].parameters(), out[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_trainer_with_grad_scaler_keeps_protected_units(tmp_path):
    """A real Trainer (default optimizer: torch's fused AdamW) whose accelerator scales the loss with a GradScaler.

    ``fp16=True`` as a user sets it. On a CPU, accelerate then runs without autocast and without a scaler, so the
    test hands the Trainer's accelerator a ``GradScaler("cpu")`` before training: prepare() wraps the optimizer
    with it and backward() scales the loss, the code path of CUDA fp16 training (fp16 autocast itself needs a GPU).
    """
    model = tiny_llama(seed=0)
    layout = UnitLayout.from_model(model)
    before = _protected(layout)
    data = ExampleDataset(random_lm_batches(4, batch_size=4, seq_len=12, seed=3))
    from transformers import Trainer

    trainer = Trainer(
        model=model,
        args=_args(tmp_path, fp16=True),
        train_dataset=data,
        callbacks=[SoftMaskCallback(_one_hot_importance(layout), mode="update")],
    )
    assert trainer.args.optim == "adamw_torch_fused"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.accelerator.scaler = scaler
    trainer.train()
    assert trainer.optimizer.scaler is scaler and scaler._get_growth_tracker() == 4  # it drove all 4 steps
    assert trainer.optimizer.optimizer._step_supports_amp_scaling
    _assert_protected_unchanged(layout, before)


def test_auto_compiles_the_masked_step_only_for_big_fused_optimizers():
    from hf_softmask.core.optim import (
        AUTO_COMPILE_AFTER_STEPS,
        AUTO_COMPILE_MIN_ELEMENTS,
        compile_available,
    )

    big = [torch.nn.Parameter(torch.zeros(AUTO_COMPILE_MIN_ELEMENTS))]
    small = [torch.nn.Parameter(torch.zeros(10))]
    expect = compile_available(torch.device("cpu")) is None
    for params, fused, want in ((big, True, expect), (big, False, False), (small, True, False)):
        opt = torch.optim.AdamW(params, fused=fused)
        handle = install_update_masks(opt, {params[0]: torch.zeros(())})
        assert handle.compiled is want, (params[0].numel(), fused)
        handle.remove()
    assert MaskedAdamW(big, fused=True).compiled is expect and MaskedAdamW(big).compiled is False
    # "auto" runs the first steps eagerly (short runs never compile); an explicit True compiles at once
    opt = torch.optim.AdamW(big, fused=True)
    handle = install_update_masks(opt, {big[0]: torch.zeros(())})
    assert handle.compile_after == AUTO_COMPILE_AFTER_STEPS > 0
    big[0].grad = torch.ones_like(big[0])
    opt.step()
    assert opt.__dict__["_hf_softmask_masked_steps"] == 1 and torch.equal(big[0], torch.zeros_like(big[0]))
    handle.remove()
    assert install_update_masks(torch.optim.AdamW(big, fused=True), {}, compiled=True).compile_after == 0


@pytest.mark.slow
def test_compiled_masked_step_under_grad_scaler_matches_torch_fused():
    """The compiled update ("auto"'s choice for big fused optimizers), forced on a tiny model: it must unscale and skip
    inf steps like torch's fused AdamW. Same model and mask shapes as test_compiled_masked_adamw_equals_foreach_step,
    so one compilation serves both."""
    results = {}
    for name in ("torch", "compiled"):
        model = tiny_llama(seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        if name == "compiled":
            layout = UnitLayout.from_model(model)
            from hf_softmask import UnitImportance

            masker = SoftMasker(
                model,
                UnitImportance.zeros_like_layout(layout),
                # zero importance: every mask is 1 ("mean" too), so the result must equal torch's
                SoftMaskConfig(mode="update", embeddings="mean", compile_update=True),
            ).attach(opt)
            assert masker._opt_handle.compiled
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
        _scaled_steps(opt, model, scaler, n_steps=4, inf_at=2)
        results[name] = (model, opt)
    (ref, ref_opt), (got, got_opt) = results["torch"], results["compiled"]
    assert "_hf_softmask_compile_error" not in got_opt.__dict__
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        # The compiled kernel rounds differently from torch's; Adam amplifies rounding-level gradient differences
        # into steps of up to 1e-5 here (parameters move ~3e-2). Scaled moments or an unskipped inf step are far off.
        torch.testing.assert_close(q, p, rtol=0, atol=5e-5, msg=name)
        assert got_opt.state[q]["step"].item() == ref_opt.state[p]["step"].item() == 3
        torch.testing.assert_close(
            got_opt.state[q]["exp_avg"], ref_opt.state[p]["exp_avg"], rtol=1e-3, atol=1e-6, msg=name
        )


def test_masked_sgd_fused_under_grad_scaler_matches_torch_fused_sgd():
    """Sibling of the fused-AdamW case: SGD(fused=True) also takes grad_scale / found_inf from the scaler."""
    from hf_softmask import MaskedSGD

    out = []
    for name in ("torch", "native", "installed"):
        model, params = _model_and_params()
        cls = MaskedSGD if name == "native" else torch.optim.SGD
        opt = cls(params, lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)
        if name == "installed":
            install_update_masks(opt, {})
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
        _scaled_steps(opt, model, scaler, n_steps=3, inf_at=1)
        out.append((model, opt))
    (ref, ref_opt), *others = out
    for got, got_opt in others:
        for p, q in zip(ref.parameters(), got.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                got_opt.state[q]["momentum_buffer"], ref_opt.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-7
            )
