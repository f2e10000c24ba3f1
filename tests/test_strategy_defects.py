"""Issue 11's defects, one test each: every test here failed on the code before its fix
(see docs/strategies_validation.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from hf_softmask.strategies import get_strategy
from hf_softmask.strategies.cbp import CBPStrategy
from hf_softmask.strategies.hat import AdaHATStrategy, HATStrategy
from hf_softmask.task_heads import MultiTaskClassifier
from tests.testing_utils import (
    batch_of,
    lm_dataset,
    logits,
    one_thread,
    random_lm_batches,
    run_task,
    task_dataset,
    tiny_bert,
    tiny_gpt2,
    train_task,
)

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _no_dropout_bert():
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _lm_loss(model, batch):
    return model(**batch).loss


# -- CBP: replaced entries get their own fresh Adam bias correction -------------------------------------------
def test_cbp_replaced_unit_moves_like_a_fresh_adam_step():
    model = _no_dropout_bert()
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0)
    cbp = CBPStrategy(replacement_rate=0.0, maturity_threshold=0)
    cbp.on_train_begin(model, opt)
    batches = random_lm_batches(4, seed=1)
    out_w = model.bert.encoder.layer[0].output.dense.weight
    units = torch.tensor([3, 7])
    grads = []
    for step in range(60):
        loss = _lm_loss(model, batches[step % 4])
        loss.backward()
        if step >= 50:
            grads.append(out_w.grad[:, units].clone())
        before = out_w.detach()[:, units].clone()
        opt.step()
        cbp.after_optimizer_step(model, opt)
        opt.zero_grad(set_to_none=True)
        if step == 49:  # replace at shared Adam step 50: the fresh entries must not inherit its bias correction
            cbp.replace_units(0, units, opt)
            assert torch.count_nonzero(out_w[:, units]) == 0
        if step >= 50:
            n = step - 49  # steps since the reset
            m = sum((1 - b1) * b1 ** (n - 1 - k) * g for k, g in enumerate(grads))
            v = sum((1 - b2) * b2 ** (n - 1 - k) * g * g for k, g in enumerate(grads))
            want = -lr * (m / (1 - b1**n)) / ((v / (1 - b2**n)).sqrt() + eps)
            torch.testing.assert_close(out_w.detach()[:, units] - before, want, rtol=1e-4, atol=1e-9)


# -- AdaHAT grad mode: the rate of THIS step's gates acts during backward -------------------------------------
def test_adahat_grad_mode_uses_this_steps_rate_on_the_first_step():
    model = _no_dropout_bert()
    ada = AdaHATStrategy(mode="grad", alpha=0.1, eps=0.1, batches_per_epoch=3)
    ada.prepare_model(model)
    ada.before_task(model, 0)
    ada.after_task(model, 0)  # task 0's mask = 1[e > 0] of its random embedding
    ada.before_task(model, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    ada.on_train_begin(model, opt)
    batch = random_lm_batches(1, seed=2)[0]
    ada.forward_kwargs(model, batch)  # first step of task 1: s = 1/s_max
    loss = _lm_loss(model, batch)
    loss.backward()
    masked = {s.name: s.param.grad.clone() for s in ada.layout.owned}
    gates = (ada.gates.head_gate.detach().clone(), ada.gates.ffn_gate.detach().clone())
    ada._masker.detach()
    model.zero_grad(set_to_none=True)
    ada.gates.head_gate, ada.gates.ffn_gate = gates
    _lm_loss(model, batch).backward()
    # by hand: R_l = sum a (1 - cum) / sum (1 - cum) over the layer's units; r = alpha / (eps + R_l);
    # rate = r / (I + r)
    a = torch.cat(gates, dim=1)
    free = 1 - torch.cat([ada.cum_heads, ada.cum_ffn], dim=1)
    R = (a * free).sum(1) / free.sum(1)
    r = 0.1 / (0.1 + R)
    checked = 0
    for s in ada.layout.owned:
        if s.kind != "ffn":
            continue
        rate = (r[s.layer] / (ada.sum_ffn[s.layer] + r[s.layer]))[s.index].view(s.broadcast_shape())
        torch.testing.assert_close(masked[s.name], s.param.grad * rate, rtol=1e-5, atol=1e-8)
        checked += 1
    assert checked == 6 and (R > 0.05).all()  # a rate with R_l = 0 would differ by far more than the tolerance


# -- HAT with gradient accumulation: each micro-batch compensated with its own s ------------------------------
def test_hat_compensation_uses_each_micro_batchs_s():
    model = _no_dropout_bert()
    hat = HATStrategy(s_max=20.0, c=0.5, batches_per_epoch=4)
    hat.prepare_model(model)
    hat.before_task(model, 0)
    model.train()
    batches = random_lm_batches(2, seed=4)
    e0 = (hat.e_heads.detach().clone(), hat.e_ffn.detach().clone())
    want = [torch.zeros_like(e0[0]), torch.zeros_like(e0[1])]
    for k, b in enumerate(batches):  # micro-batches 1 and 2 of an epoch of 4: s = 1/20 and 1/20 + (20 - 1/20)/3
        s = 1 / 20 + (20 - 1 / 20) * k / 3
        eh, ef = (e0[0].clone().requires_grad_(True), e0[1].clone().requires_grad_(True))
        hat.gates.head_gate, hat.gates.ffn_gate = torch.sigmoid(s * eh), torch.sigmoid(s * ef)
        hat._training_gates = True
        loss = _lm_loss(model, b) + hat.extra_loss(model, b, None)
        gh, gf = torch.autograd.grad(loss, [eh, ef])
        for i, (g, e) in enumerate(((gh, e0[0]), (gf, e0[1]))):
            want[i] += g * (20 / s) * (torch.cosh(torch.clamp(s * e, -50, 50)) + 1) / (torch.cosh(e) + 1)
    model.zero_grad(set_to_none=True)
    hat._batch_in_epoch = 0
    for b in batches:  # the strategy's own path: two backward passes, then one optimizer step
        hat.forward_kwargs(model, b)
        (_lm_loss(model, b) + hat.extra_loss(model, b, None)).backward()
    hat.after_backward(model)
    torch.testing.assert_close(hat.e_heads.grad, want[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(hat.e_ffn.grad, want[1], rtol=1e-4, atol=1e-7)


# -- TaLoS: parameters with no gradient path are not candidates -------------------------------------------------
def _bert_with_pooler_classifier():
    from transformers import BertModel

    bert = tiny_bert(model_cls=BertModel, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MultiTaskClassifier(bert, [2, 3])  # mean pooling: the BERT pooler never touches the loss


def test_talos_excludes_parameters_without_gradient_path():
    model = _bert_with_pooler_classifier()
    model.set_task(0)
    talos = get_strategy("talos", keep_fraction=0.1, rounds=2, examples_per_round=8)
    with pytest.warns(RuntimeWarning, match="never affect the loss"):
        talos.before_task(model, 0, DataLoader(task_dataset(0, n=16), batch_size=8))
    pooler = "backbone.pooler.dense.weight"
    assert pooler in dict(model.named_parameters())
    assert pooler not in talos.trainable  # before: Fisher 0 ranked it least sensitive, ~all of it was trainable
    assert pooler in talos.excluded
    assert talos.trainable_fraction() == pytest.approx(0.1, abs=1e-4)  # the budget is over the reachable entries
    masks = talos.update_masks(model)
    pool_p = dict(model.named_parameters())[pooler]
    assert float(masks[pool_p].float().max()) == 0.0  # frozen


# -- memory ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wsn_trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wsn_mem")
    strategy = get_strategy("wsn", keep_ratio=0.5)
    model = strategy.prepare_model(MultiTaskClassifier(tiny_bert().bert, [2, 3]))
    train_task(model, strategy, task_dataset(0, n=16), 0, tmp, learning_rate=1e-2, num_train_epochs=1)
    return model, strategy


def test_wsn_keeps_no_importance_tensor(wsn_trained, tmp_path):
    model, strategy = wsn_trained
    for layer in model.backbone.subnetwork_layers().values():
        assert "default" not in layer.subnet_importance  # WSN never reads an importance: none is allocated
    strategy.save_model(model, tmp_path)
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(tmp_path / "adapter_model.safetensors")) if "importance" in k]


def test_wsn_update_masks_are_bool(wsn_trained):
    model, strategy = wsn_trained
    masks = strategy.update_masks(model)
    assert masks and all(m.dtype == torch.bool for m in masks.values())


def test_finished_task_masks_stay_bit_packed_while_the_next_trains(wsn_trained):
    model, _ = wsn_trained
    d0 = task_dataset(0, n=8)
    model.set_task(0)
    logits(model, batch_of(d0))  # evaluating a finished task unpacks its mask ...
    model.set_task(1)  # ... selecting the next task drops it: only the packed bits stay
    for layer in model.backbone.subnetwork_layers().values():
        assert layer._mask_cache is None
        held = [t for t in layer.subnet_masks["default"].values()]
        assert held and all(t.dtype == torch.uint8 for t in held)


def test_talos_update_masks_and_task_vectors_are_bits(tmp_path):
    model = tiny_gpt2()
    talos = get_strategy(
        "talos", keep_fraction=0.2, rounds=1, examples_per_round=4, task_vector_dir=str(tmp_path / "tv")
    )
    run_task(model, talos, lm_dataset(n_batches=2), tmp_path / "run", 0, learning_rate=1e-3)
    per_entry = [m for m in talos.update_masks(model).values() if m.dim() > 0]
    assert per_entry and all(m.dtype == torch.bool for m in per_entry)
    tv = talos.task_vectors[0]
    for name, shape in tv.shapes.items():
        n = math.prod(shape)
        assert tv.masks[name].dtype == torch.uint8 and tv.masks[name].numel() == math.ceil(n / 8)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "tv" / "task_0.safetensors"))
    assert not [k for k, v in saved.items() if v.dtype == torch.int64]


# -- TSS importance ---------------------------------------------------------------------------------------------
def test_score_importance_leaves_no_grad_on_the_task_head():
    strategy = get_strategy("tss")
    model = strategy.prepare_model(MultiTaskClassifier(tiny_bert().bert, [2, 3]))
    model.set_task(0)
    strategy.before_task(model, 0)
    strategy.after_task(model, 0, DataLoader(task_dataset(0, n=8), batch_size=8))
    left = [n for n, p in model.named_parameters() if p.grad is not None]
    assert not left, left


def test_tss_weights_pruned_by_the_task_get_importance_zero():
    strategy = get_strategy("tss", init_score=0.02, score_init="magnitude", threshold=0.0)
    model = strategy.prepare_model(MultiTaskClassifier(tiny_bert().bert, [2, 3]))
    model.set_task(0)
    strategy.before_task(model, 0)
    pruned = {}
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.backbone.score_parameters().items():
            pruned[name] = torch.rand(p.shape, generator=g) < 0.3
            p[pruned[name]] = -1.0  # below the threshold: not in task 0's subnetwork
    strategy.after_task(model, 0, DataLoader(task_dataset(0, n=16), batch_size=8))
    for name, imp in model.backbone.importance().items():
        assert (imp[pruned[name]] == 0).all(), name
        assert imp[~pruned[name]].mean() > 0.2, name
