"""HAT / AdaHAT: earlier tasks' units frozen bit-for-bit, task outputs reproducible under their mask,
annealing, state."""

from __future__ import annotations

import pytest
import torch

from hf_softmask.core.layout import UnitLayout
from hf_softmask.strategies import get_strategy
from hf_softmask.strategies.hat import AdaHATStrategy, HATStrategy, hat_scale
from tests.testing_utils import lm_dataset, logits_of, random_lm_batches, run_task, tiny_bert, tiny_llama


def _owned_rows(layout, heads_mask, ffn_mask):
    """{param name: bool tensor of the entries owned by units where the mask is 1}."""
    out = {}
    for s in layout.owned:
        unit = layout.unit_values(s.kind, s.layer, heads_mask, ffn_mask)[s.index] > 0
        shape = [1] * s.param.dim()
        shape[s.axis] = -1
        sel = unit.view(shape).expand_as(s.param)
        out[s.name] = sel if s.name not in out else (out[s.name] | sel)
    return out


def test_hat_scale_counts_batches_from_one():
    assert hat_scale(1, 10, 400) == pytest.approx(1 / 400)
    assert hat_scale(10, 10, 400) == pytest.approx(400)
    assert all(hat_scale(b, 7, 400) > 0 for b in range(1, 8))
    assert hat_scale(1, 1, 400) == 400  # one batch per epoch: no division by zero
    with pytest.raises(ValueError):
        hat_scale(0, 10, 400)


def test_earlier_task_units_and_outputs_unchanged(tmp_path):
    model = tiny_llama()  # GQA: 4 query heads share 2 kv-heads
    hat = get_strategy("hat")
    model = hat.prepare_model(model)
    run_task(model, hat, lm_dataset(seed=0), tmp_path / "a", 0, weight_decay=0.1, learning_rate=1e-2)
    ev = random_lm_batches(2, seed=11)
    hat.set_task(0)
    task0_logits = logits_of(model, ev)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layout = UnitLayout.from_model(model)
    protected = _owned_rows(layout, hat.cum_heads, hat.cum_ffn)
    assert 0 < hat.cum_ffn.mean() < 1

    run_task(model, hat, lm_dataset(seed=1), tmp_path / "b", 1, weight_decay=0.1, learning_rate=1e-2)
    owned_names = {s.name for s in layout.owned}
    free_moved = 0
    for name, p in model.named_parameters():
        if name in owned_names:
            sel = protected[name]
            assert torch.equal(p.detach()[sel], before[name][sel]), f"protected entries of {name} changed"
            free_moved += int((p.detach()[~sel] != before[name][~sel]).sum())
        else:  # unowned parameters are frozen from the second task on (default policy)
            assert torch.equal(p.detach(), before[name]), f"unowned {name} changed"
    assert free_moved > 0  # the second task did train the units nobody used
    hat.set_task(0)
    assert torch.equal(logits_of(model, ev), task0_logits)
    hat.set_task(1)
    assert not torch.equal(logits_of(model, ev), task0_logits)


def test_regularizer_and_state_roundtrip(tmp_path):
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hat = HATStrategy(c=0.5, s_max=100)
    run_task(model, hat, lm_dataset(seed=0, n_batches=2), tmp_path / "a", 0)
    model.eval()
    hat.set_task(0)
    ev = random_lm_batches(1, seed=3)
    want = logits_of(model, ev)
    hat.save_pretrained(tmp_path / "ckpt")

    restored = HATStrategy(c=0.5, s_max=100)
    restored.load_pretrained(tmp_path / "ckpt")
    fresh = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fresh.load_state_dict(model.state_dict())
    hat.gates.remove()
    restored.prepare_model(fresh)
    restored.set_task(0)
    assert torch.equal(logits_of(fresh, ev), want)
    assert torch.equal(restored.masks[0][1], hat.masks[0][1])
    assert restored.task_id == 0


def test_first_task_regularizer_is_c_times_mean_gate():
    model = tiny_bert()
    hat = HATStrategy(c=0.5, batches_per_epoch=1)
    hat.before_task(model, 0)
    model.train()
    hat.forward_kwargs(model, {})  # B = 1: s = s_max
    a = torch.cat([hat.gates.head_gate.flatten(), hat.gates.ffn_gate.flatten()])
    torch.testing.assert_close(hat.extra_loss(model, {}, None), 0.5 * a.mean())


def test_adahat_soft_rate_lets_used_units_move_less(tmp_path):
    model = tiny_llama()
    ada = AdaHATStrategy(alpha=0.1, eps=0.1)
    run_task(model, ada, lm_dataset(seed=0), tmp_path / "a", 0, weight_decay=0.0, learning_rate=1e-2)
    used = ada.cum_ffn.clone()
    # rate r/(I+r) with R_l = 0 outside training: r = alpha/eps = 1, so used units (I=1) get 1/2, free ones 1
    imp = ada._protection()
    torch.testing.assert_close(imp.ffn, used * 0.5)
    before = {l: m.mlp.up_proj.weight.detach().clone() for l, m in enumerate(model.model.layers)}
    run_task(model, ada, lm_dataset(seed=1), tmp_path / "b", 1, weight_decay=0.0, learning_rate=1e-2)
    for l, m in enumerate(model.model.layers):
        delta = (m.mlp.up_proj.weight.detach() - before[l]).abs().mean(1)
        on = used[l] > 0
        assert delta[on].min() > 0  # AdaHAT does not freeze used units ...
        assert delta[on].mean() < delta[~on].mean()  # ... but moves them less
    assert ada.sum_ffn.max() <= 2
