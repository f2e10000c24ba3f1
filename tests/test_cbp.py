"""CBP: replacement is function-preserving at the moment it happens, state round-trips,
plain-Trainer callback works."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_softmask.strategies import get_strategy
from hf_softmask.strategies.cbp import CBPCallback, CBPStrategy
from tests.testing_utils import lm_dataset, logits_of, random_lm_batches, run_task, tiny_bert, tiny_gpt2, train_args

UNIT = 3


def _bert_with_constant_unit():
    """Tiny BERT (no dropout) whose FFN neuron UNIT has a constant activation and the lowest utility."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            inter = layer.intermediate.dense
            inter.bias.fill_(2.0)  # every other neuron: |h| ~ 2, so UNIT (|h| ~ 0.35) is the least useful
            inter.weight[UNIT].zero_()
            inter.bias[UNIT] = 0.5
    return model


def test_replacement_preserves_output_inside_trainer_run(tmp_path):
    model = _bert_with_constant_unit()
    ev = random_lm_batches(2, seed=7)
    before = logits_of(model, ev)
    maturity = 3
    # rate 1/I with all I neurons eligible: exactly one replacement per layer, on the last step
    cbp = CBPStrategy(replacement_rate=1 / 64, maturity_threshold=maturity, decay_rate=0.9)
    old_bias = [l.output.dense.bias.detach().clone() for l in model.bert.encoder.layer]
    trainer = run_task(
        model, cbp, lm_dataset(n_batches=maturity + 1), tmp_path, 0, learning_rate=0.0, weight_decay=0.0
    )
    assert cbp.last_replaced == {0: [UNIT], 1: [UNIT]}
    assert cbp.num_replaced.tolist() == [1.0, 1.0]
    after = logits_of(model, ev)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=0)
    for l, layer in enumerate(model.bert.encoder.layer):
        # the compensation is real: the bias moved by the neuron's mean contribution
        assert (layer.output.dense.bias - old_bias[l]).abs().max() > 1e-3
        assert torch.count_nonzero(layer.output.dense.weight[:, UNIT]) == 0
        assert layer.intermediate.dense.bias[UNIT] == 0
        row = layer.intermediate.dense.weight[UNIT]
        assert 0.005 < row.std() < 0.06  # re-drawn from N(0, initializer_range=0.02), not U[0, 1)
        state = trainer.optimizer.state[layer.intermediate.dense.weight]
        assert torch.count_nonzero(state["exp_avg"][UNIT]) == 0 and torch.count_nonzero(state["exp_avg_sq"][UNIT]) == 0
        assert torch.count_nonzero(state["exp_avg"]) > 0  # only the replaced row was reset
        out_state = trainer.optimizer.state[layer.output.dense.weight]
        assert torch.count_nonzero(out_state["exp_avg"][:, UNIT]) == 0
    assert cbp.age[:, UNIT].tolist() == [0.0, 0.0] and cbp.age[0, 0] == maturity + 1


def test_small_rate_accumulates_and_state_roundtrips(tmp_path):
    model = tiny_gpt2()
    cbp = get_strategy("cbp", replacement_rate=0.02, maturity_threshold=1)
    # 128 neurons * 0.02 = 2.56 per step once mature: fractional parts carry over
    run_task(model, cbp, lm_dataset(n_batches=5), tmp_path / "run", 0, learning_rate=1e-3)
    # four mature steps * ~2.5 neurons: about 10 per layer, although no single step reaches a whole 3
    assert all(8 <= n <= 11 for n in cbp.num_replaced.tolist()), cbp.num_replaced
    assert (cbp.pending < 1).all() and (cbp.pending >= 0).all()
    assert cbp.steps == 5
    cbp.save_pretrained(tmp_path / "ckpt")
    restored = CBPStrategy(replacement_rate=0.02, maturity_threshold=1)
    restored.load_pretrained(tmp_path / "ckpt")
    for key, value in cbp.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert restored.steps == 5


def test_cbp_callback_with_plain_trainer(tmp_path):
    model = tiny_gpt2()
    cb = CBPCallback(replacement_rate=0.05, maturity_threshold=1)
    Trainer(model=model, args=train_args(tmp_path), train_dataset=lm_dataset(n_batches=4), callbacks=[cb]).train()
    assert cb.strategy.num_replaced.sum() > 0
    assert cb.strategy._handles == []  # hooks removed after training


def test_cbp_refuses_adaptive_optimizers_it_cannot_restart():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="Adamax"):
        CBPStrategy().on_train_begin(model, torch.optim.Adamax(model.parameters()))
    with pytest.raises(ValueError, match="amsgrad"):
        CBPStrategy().on_train_begin(model, torch.optim.AdamW(model.parameters(), amsgrad=True))
    CBPStrategy().on_train_begin(model, torch.optim.SGD(model.parameters(), lr=0.1))  # no bias correction to restart


def test_fresh_correction_skips_a_step_that_did_not_happen():
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    cbp = CBPStrategy(replacement_rate=0.0)
    cbp.on_train_begin(model, opt)
    b = random_lm_batches(1)[0]
    model(**b).loss.backward()
    opt.step()
    cbp.after_optimizer_step(model, opt)
    cbp.replace_units(0, torch.tensor([1, 2]), opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cbp.after_optimizer_step(model, opt)  # e.g. a GradScaler skipped the step on inf: Adam's step count did not move
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def _cbp_trainer(model, cbp, out, **args):
    from hf_softmask.strategies import StrategyTrainer

    dataset = lm_dataset(n_batches=6)
    cbp.before_task(model, 0, torch.utils.data.DataLoader(dataset, batch_size=4))
    kw = dict(learning_rate=1e-3, weight_decay=0.0, save_strategy="steps", save_steps=1, max_steps=6, **args)
    return StrategyTrainer(model=model, args=train_args(out, **kw), train_dataset=dataset, strategy=cbp)


def test_resume_right_after_a_replacement_equals_the_uninterrupted_run(tmp_path):
    """The per-entry Adam bias correction of freshly replaced units is saved in each checkpoint: a run resumed
    from one taken right after a replacement ends with the uninterrupted run's weights (before, the resumed run
    fell back to the shared correction for those entries and drifted)."""
    settings = dict(replacement_rate=0.05, maturity_threshold=1, decay_rate=0.0)
    whole = tiny_gpt2()
    cbp = get_strategy("cbp", **settings)
    _cbp_trainer(whole, cbp, tmp_path / "whole").train()
    assert cbp.num_replaced.sum() > 0
    checkpoint = tmp_path / "whole" / "checkpoint-2"  # the first replacements: step 2 (age > maturity 1)

    resumed = tiny_gpt2()
    again = get_strategy("cbp", **settings)  # its state comes from the checkpoint (StrategyTrainer.train)
    _cbp_trainer(resumed, again, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
