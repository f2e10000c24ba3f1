"""Soft-masking in real Trainer runs: exact protection, AdamW behaviour, accumulation, SoftMaskTrainer."""

import pytest
import torch
from transformers import Trainer

from hf_softmask import (
    ImportanceShapeError,
    SoftMaskCallback,
    SoftMaskConfig,
    SoftMaskTrainer,
    SoftMaskTrainingArguments,
    UnitImportance,
    UnitLayout,
    build_param_masks,
)
from tests.testing_utils import TINY_MODELS, ExampleDataset, random_lm_batches, train_args


def _args(tmp_path, cls=None, **kw):
    return train_args(tmp_path, cls=cls, **{"max_steps": 4, "lr_scheduler_type": "constant", **kw})


def _train(model, tmp_path, callbacks=(), n_examples=16, **kw):
    data = ExampleDataset(random_lm_batches(n_examples // 4, batch_size=4, seq_len=12, seed=3))
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=data, callbacks=list(callbacks))
    trainer.train()
    return trainer


def _unit_slice(s, layout, head, ffn_unit, layer_h, layer_f):
    """Entries of OwnedSlice ``s`` that belong to the chosen head / FFN neuron (or None)."""
    if s.kind == "ffn":
        if s.layer != layer_f:
            return None
        unit = ffn_unit
    else:
        if s.layer != layer_h:
            return None
        unit = head // layout.group_size if s.kind == "kv_head" else head
    pos = (s.index == unit).nonzero().flatten()
    return s.param.detach().index_select(s.axis, pos).clone()


def _one_hot_importance(layout, layer_h=1, head=2, layer_f=0, ffn_unit=5):
    imp = UnitImportance.zeros_like_layout(layout)
    imp.heads[layer_h, head] = 1.0
    imp.ffn[layer_f, ffn_unit] = 1.0
    return imp


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_importance_one_freezes_exactly_the_owned_slices_under_adamw(family, tmp_path):
    model = TINY_MODELS[family]()
    layout = UnitLayout.from_model(model)
    imp = _one_hot_importance(layout)
    protected_before = [_unit_slice(s, layout, 2, 5, 1, 0) for s in layout.owned]
    other_before = [_unit_slice(s, layout, 0, 9, 1, 0) for s in layout.owned]
    _train(model, tmp_path, [SoftMaskCallback(imp, mode="update")], weight_decay=0.1)
    n_checked = 0
    for s, before, other in zip(layout.owned, protected_before, other_before):
        if before is None:
            continue
        after = _unit_slice(s, layout, 2, 5, 1, 0)
        assert torch.equal(after, before), f"{s.name} changed although its unit has importance 1"
        n_checked += 1
        if s.kind != "kv_head":  # the other kv-head of a GQA group may be shared with the protected head
            assert not torch.equal(_unit_slice(s, layout, 0, 9, 1, 0), other), (
                f"{s.name}: unprotected unit did not train"
            )
    assert n_checked >= 6
    # The callback leaves no trace: a later plain step moves the protected slices again.
    assert all(len(p._backward_hooks or {}) == 0 for p in model.parameters())


def _distance(params_before, model, layout):
    owned = {id(s.param) for s in layout.owned}
    return (
        sum(float((p.detach() - params_before[n]).norm() ** 2) for n, p in model.named_parameters() if id(p) in owned)
        ** 0.5
    )


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_update_mode_holds_under_adamw_and_grad_mode_does_not(family, tmp_path):
    """Units of importance 0.9 move <= 0.2x as far as unmasked (update mode); grad mode is cancelled by Adam."""
    moved = {}
    for mode in (None, "update", "grad"):
        model = TINY_MODELS[family]()
        layout = UnitLayout.from_model(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        imp = UnitImportance(torch.full((2, 4), 0.9), torch.full((2, layout.ffn_size), 0.9))
        cbs = [SoftMaskCallback(imp, mode=mode)] if mode else []
        _train(model, tmp_path / str(mode), cbs, learning_rate=1e-3, max_steps=6, weight_decay=0.01)
        moved[mode] = _distance(before, model, layout)
    assert moved["update"] / moved[None] <= 0.2
    assert moved["grad"] / moved[None] > 0.8  # the papers' gradient masking barely slows AdamW


def test_grad_mode_is_applied_once_per_step_under_accumulation(tmp_path):
    """SGD, mask 0.5: one step with 2 accumulated micro-batches moves exactly half as far (m, not m**2).

    The learning rate is large only so that the parameter change dwarfs float32 rounding of the weights.
    """
    results = {}
    # Compared within the same accumulation setting: how the Trainer scales an accumulated MLM loss is
    # its own business; the mask must contribute exactly one factor m either way.
    for name, mode, bs, accum in [
        ("plain", None, 8, 1),
        ("masked", "grad", 8, 1),
        ("plain_accum", None, 4, 2),
        ("masked_accum", "grad", 4, 2),
    ]:
        model = TINY_MODELS["bert"](hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        layout = UnitLayout.from_model(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        imp = UnitImportance(torch.full((2, 4), 0.5), torch.full((2, 64), 0.5))
        cbs = [SoftMaskCallback(imp, mode=mode)] if mode else []
        _train(
            model,
            tmp_path / name,
            cbs,
            n_examples=8,
            optim="sgd",
            learning_rate=100.0,
            weight_decay=0.0,
            max_steps=1,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accum,
            max_grad_norm=0.0,
        )
        q = layout.owned[0]
        results[name] = q.param.detach() - before[q.name]
    tol = 1e-4 * float(results["plain"].abs().max())
    torch.testing.assert_close(results["masked"], 0.5 * results["plain"], rtol=1e-4, atol=tol)
    torch.testing.assert_close(results["masked_accum"], 0.5 * results["plain_accum"], rtol=1e-4, atol=tol)


def test_unowned_policies(tmp_path):
    model = TINY_MODELS["gpt2"]()
    layout = UnitLayout.from_model(model)
    imp = UnitImportance.zeros_like_layout(layout)
    masks = build_param_masks(layout, imp, SoftMaskConfig(embeddings="freeze", norms="mean", other="train"))
    wte = model.transformer.wte.weight
    assert float(masks[wte]) == 0.0
    assert float(masks[model.transformer.h[0].ln_1.weight]) == pytest.approx(1.0)
    assert model.transformer.h[0].attn.c_proj.bias not in masks
    before = wte.detach().clone()
    _train(model, tmp_path, [SoftMaskCallback(imp, embeddings="freeze")])
    assert torch.equal(wte.detach(), before)
    with pytest.raises(ValueError, match="policy"):
        SoftMaskConfig(norms="sometimes")
    with pytest.raises(ValueError, match="mode"):
        SoftMaskConfig(mode="both")


def test_importance_of_another_model_is_rejected_at_train_begin(tmp_path):
    imp = UnitImportance.zeros_like_layout(UnitLayout.from_model(TINY_MODELS["gpt2"]()))
    with pytest.raises(ImportanceShapeError, match="recompute"):
        _train(TINY_MODELS["bert"](), tmp_path, [SoftMaskCallback(imp)])


def test_softmask_trainer_reads_importance_from_args_and_saves_it_with_checkpoints(tmp_path):
    model = TINY_MODELS["llama"]()
    layout = UnitLayout.from_model(model)
    _one_hot_importance(layout).save_pretrained(tmp_path / "imp")
    protected = [_unit_slice(s, layout, 2, 5, 1, 0) for s in layout.owned]
    args = _args(
        tmp_path / "out",
        cls=SoftMaskTrainingArguments,
        importance_path=str(tmp_path / "imp"),
        save_strategy="steps",
        save_steps=2,
        softmask_mode="update",
    )
    data = ExampleDataset(random_lm_batches(4, seq_len=12))
    trainer = SoftMaskTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    for s, before in zip(layout.owned, protected):
        if before is not None:
            assert torch.equal(_unit_slice(s, layout, 2, 5, 1, 0), before)
    ckpt = tmp_path / "out" / "checkpoint-2"
    loaded = UnitImportance.from_pretrained(ckpt, layout=layout)
    assert loaded.heads[1, 2] == 1.0
    # Resuming from the checkpoint keeps masking with the same importance.
    trainer2 = SoftMaskTrainer(
        model=model,
        args=_args(
            tmp_path / "out", cls=SoftMaskTrainingArguments, importance_path=str(ckpt), max_steps=6, save_strategy="no"
        ),
        train_dataset=data,
    )
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    for s, before in zip(layout.owned, protected):
        if before is not None:
            assert torch.equal(_unit_slice(s, layout, 2, 5, 1, 0), before)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", "sgd"])
def test_freeze_policy_in_grad_mode_does_not_move_the_parameter(optim, tmp_path):
    """Grad mode zeroes the frozen parameter's gradient; weight decay must not move it either."""
    model = TINY_MODELS["gpt2"]()
    layout = UnitLayout.from_model(model)
    wte = model.transformer.wte.weight
    before = wte.detach().clone()
    _train(
        model,
        tmp_path,
        [SoftMaskCallback(UnitImportance.zeros_like_layout(layout), mode="grad", embeddings="freeze")],
        weight_decay=0.1,
        optim=optim,
    )
    assert torch.equal(wte.detach(), before)


def test_compile_update_setting_is_validated_and_parsed():
    assert SoftMaskConfig().compile_update == "auto"
    assert SoftMaskConfig(compile_update="False").compile_update is False  # as a command-line flag arrives
    with pytest.raises(ValueError, match="compile_update"):
        SoftMaskConfig(compile_update="sometimes")


def test_gradient_hooks_refuse_dtensor_parameters(tmp_path):
    """Tensor hooks never fire on FSDP2's DTensor parameters; GradMaskHooks must say so instead of masking nothing."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_softmask.core.masking import GradMaskHooks

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="ShardedGradMask"):
            GradMaskHooks({p: torch.ones(4, 1)})
    finally:
        dist.destroy_process_group()
