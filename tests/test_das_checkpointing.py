"""Gradient checkpointing under DAS: the gates and view dropout shape the recomputed forward exactly as the first one.

docs/algorithms.md §8: backward re-runs checkpointed layers; a hook removed before backward makes the
recomputation differ (non-reentrant: ``CheckpointError``; reentrant: silently wrong gradients).
"""

from __future__ import annotations

import pytest
import torch

from hf_softmask.core.importance import UnitImportance
from hf_softmask.core.importance_compute import compute_importance
from hf_softmask.core.layout import UnitLayout
from hf_softmask.strategies.das import DASStrategy
from tests.testing_utils import random_lm_batches, tiny_bert, tiny_llama

MODELS = {"bert": tiny_bert, "llama": tiny_llama}


def _random_importance(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return UnitImportance(
        torch.rand(layout.num_layers, layout.num_heads, generator=g),
        torch.rand(layout.num_layers, layout.ffn_size, generator=g),
    )


def _das_grads(model_fn, checkpointing, view_gradients=True, seed=0):
    """Gradients of one DAS loss (LM + contrastive), as StrategyTrainer computes it, on a fresh model."""
    model = model_fn(seed=1).train()
    model.config.use_cache = False
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    strategy = DASStrategy(show_progress=False, view_gradients=view_gradients)
    strategy.importance = _random_importance(UnitLayout.from_model(model))
    batch = random_lm_batches(1, batch_size=3, seq_len=10, seed=2)[0]
    batch["attention_mask"][0, 7:] = 0  # padding: pooling must use the mask in every view
    torch.manual_seed(seed)
    out = model(**batch, **strategy.forward_kwargs(model, batch))
    loss = out.loss + strategy.extra_loss(model, batch, out)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("view_gradients", [True, False], ids=["view-grads", "stop-grad-views"])
@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_das_loss_gradients_equal_with_and_without_checkpointing(arch, checkpointing, view_gradients):
    loss_ref, ref = _das_grads(MODELS[arch], None, view_gradients)
    loss_ckpt, got = _das_grads(MODELS[arch], checkpointing, view_gradients)
    assert torch.allclose(loss_ref, loss_ckpt, rtol=1e-5, atol=1e-6)
    assert ref.keys() == got.keys() and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    ("arch", "objective"), [("bert", "lm_loss"), ("bert", "kl_dropout"), ("llama", "kl_dropout"), ("llama", "lm_loss")]
)
def test_importance_equal_with_and_without_checkpointing(arch, objective, checkpointing):
    """compute_importance's trainable gates (and Llama's perturbation dropout) sit inside checkpointed layers."""
    batches = random_lm_batches(2, batch_size=2, seq_len=8, seed=4)

    def importance(ckpt):
        model = MODELS[arch](seed=1)
        model.config.use_cache = False
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
        torch.manual_seed(0)
        return compute_importance(model, batches, objective, normalize=False, show_progress=False)

    ref, got = importance(False), importance(True)
    assert ref.heads.abs().sum() > 0
    torch.testing.assert_close(got.heads, ref.heads, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got.ffn, ref.ffn, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_recomputation_uses_the_gates_of_the_forward_not_later_ones(checkpointing):
    """Gates changed, disabled or removed between forward and backward (HAT resets them every step)."""
    from hf_softmask.core.gates import UnitGates

    def grads(ckpt, change):
        model = tiny_llama(seed=1).train()
        model.config.use_cache = False
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
        layout = UnitLayout.from_model(model)
        imp = _random_importance(layout)
        batch = random_lm_batches(1, batch_size=2, seq_len=8, seed=2)[0]
        torch.manual_seed(0)
        gates = UnitGates(layout, imp.heads, imp.ffn, dropout=0.2)
        loss = model(**batch).loss
        later = UnitGates(layout, imp.heads.flip(0), None)  # installed after the forward: must not act on the replay
        change(gates)
        loss.backward()
        gates.remove()
        later.remove()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    changes = {
        "reassigned": lambda g: setattr(g, "head_gate", torch.zeros_like(g.head_gate)),
        "disabled": lambda g: setattr(g, "enabled", False),
        "removed": lambda g: g.remove(),
    }
    ref = grads(False, lambda g: None)
    for name, change in changes.items():
        got = grads(True, change)
        for n in ref:
            torch.testing.assert_close(
                got[n], ref[n], rtol=1e-4, atol=1e-7, msg=lambda m, name=name, n=n: f"{name}, {n}: {m}"
            )


def test_gates_leave_no_hook_or_wrapper_behind():
    from hf_softmask.core.gates import UnitGates

    model = tiny_bert()
    model.gradient_checkpointing_enable()
    before = {n: m.__dict__.get("_gradient_checkpointing_func") for n, m in model.named_modules()}
    with UnitGates(UnitLayout.from_model(model), dropout=0.1):
        assert any(
            type(m.__dict__.get("_gradient_checkpointing_func")).__name__ == "_ReplayGates" for m in model.modules()
        )
    assert {n: m.__dict__.get("_gradient_checkpointing_func") for n, m in model.named_modules()} == before
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_gates_computed_from_trainable_embeddings_backpropagate_under_checkpointing(checkpointing):
    """HAT's gates are sigmoid(s*e), one non-leaf tensor shared by every layer: reentrant checkpointing runs one
    backward per layer and used to traverse that graph twice ("Trying to backward through the graph a second time")."""
    from hf_softmask.core.gates import UnitGates

    def grads(ckpt):
        model = tiny_llama(seed=1).train()
        model.config.use_cache = False
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
        layout = UnitLayout.from_model(model)
        g = torch.Generator().manual_seed(0)
        e_heads = torch.randn(layout.num_layers, layout.num_heads, generator=g).requires_grad_()
        e_ffn = torch.randn(layout.num_layers, layout.ffn_size, generator=g).requires_grad_()
        batch = random_lm_batches(1, batch_size=2, seq_len=8, seed=2)[0]
        with UnitGates(layout, torch.sigmoid(4 * e_heads), torch.sigmoid(4 * e_ffn)):
            model(**batch).loss.backward()
        return e_heads.grad, e_ffn.grad, model.model.layers[0].self_attn.q_proj.weight.grad

    for ref, got in zip(grads(False), grads(True)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-8)
