"""EWC and KD: their defining terms, effect on forgetting of the anchor, and state round-trips; ncl/ft registered."""

from __future__ import annotations

import torch

from hf_softmask.strategies import get_strategy
from hf_softmask.strategies.ewc import EWCStrategy
from hf_softmask.strategies.kd import KDStrategy, distillation_kl
from tests.testing_utils import lm_dataset, logits_of, random_lm_batches, run_task, tiny_bert, tiny_gpt2


def _fisher_drift(model, anchor, fisher):
    """sum F (theta - theta*)^2: the displacement EWC penalizes."""
    return sum(
        float((fisher[n] * (p.detach() - anchor[n]).pow(2)).sum()) for n, p in model.named_parameters() if n in anchor
    )


def test_ewc_penalty_matches_formula_and_holds_weights(tmp_path):
    runs = {}
    for lam in (0.0, 1000.0):
        model = tiny_gpt2()
        ewc = EWCStrategy(ewc_lambda=lam, fisher_examples=8)
        run_task(
            model, ewc, lm_dataset(seed=0, n_batches=2), tmp_path / f"a{lam}", 0, learning_rate=1e-2, weight_decay=0.0
        )
        assert ewc.fisher and set(ewc.fisher) == set(ewc.anchor)
        # normalized Fisher: mean entry 1
        total = sum(float(f.sum()) for f in ewc.fisher.values()) / sum(f.numel() for f in ewc.fisher.values())
        assert abs(total - 1) < 1e-4
        anchor = {n: a.clone() for n, a in ewc.anchor.items()}
        fisher = {n: f.clone() for n, f in ewc.fisher.items()}
        with torch.no_grad():
            p = dict(model.named_parameters())["transformer.h.0.mlp.c_fc.weight"]
            p.add_(0.01)
        want = 0.5 * lam * float(ewc.fisher["transformer.h.0.mlp.c_fc.weight"].sum()) * 1e-4
        got = ewc.penalty(model).detach()
        assert abs(float(got) - want) <= 1e-3 * max(want, 1e-8)
        with torch.no_grad():
            p.sub_(0.01)
        run_task(
            model, ewc, lm_dataset(seed=1, n_batches=4), tmp_path / f"b{lam}", 1, learning_rate=1e-2, weight_decay=0.0
        )
        runs[lam] = _fisher_drift(model, anchor, fisher)
        if lam:
            assert ewc.last_penalty is not None and ewc.last_penalty > 0
            ewc.save_pretrained(tmp_path / "ckpt")
            restored = EWCStrategy(ewc_lambda=lam)
            restored.load_pretrained(tmp_path / "ckpt")
            torch.testing.assert_close(restored.penalty(model), ewc.penalty(model))
            assert restored.tasks_consolidated == 2
    assert runs[1000.0] < 0.5 * runs[0.0]  # the penalty keeps the weights near the anchor


def test_distillation_kl_is_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(distillation_kl(x, x, 2.0, mask)) < 1e-6
    y = x.clone()
    y[0, 4] += 10  # a padded position: ignored
    assert float(distillation_kl(y, x, 2.0, mask)) < 1e-6
    assert float(distillation_kl(x + torch.randn_like(x), x, 2.0, mask)) > 1e-3


def test_kd_keeps_previous_outputs_closer_and_resumes(tmp_path):
    ev = random_lm_batches(2, seed=21)
    drift = {}
    for weight in (0.0, 20.0):
        model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        kd = get_strategy("kd", kd_weight=weight, kd_temperature=2.0)
        run_task(
            model,
            kd,
            lm_dataset(seed=0, n_batches=2),
            tmp_path / f"a{weight}",
            0,
            learning_rate=5e-3,
            weight_decay=0.0,
        )
        assert kd.teacher is not None and not any(p.requires_grad for p in kd.teacher.parameters())
        old = logits_of(model, ev)
        torch.testing.assert_close(logits_of(kd.teacher, ev), old)
        run_task(
            model,
            kd,
            lm_dataset(seed=1, n_batches=4),
            tmp_path / f"b{weight}",
            1,
            learning_rate=5e-3,
            weight_decay=0.0,
            after=False,
        )
        drift[weight] = float(distillation_kl(logits_of(model, ev), old, 1.0))
        if weight:
            assert kd.last_kd_loss is not None
            kd.save_pretrained(tmp_path / "ckpt")
            restored = KDStrategy(kd_weight=weight)
            restored.load_pretrained(tmp_path / "ckpt")
            restored.before_task(model, 1)
            torch.testing.assert_close(logits_of(restored.teacher, ev), old)
    assert drift[20.0] < 0.7 * drift[0.0]


def test_naive_baselines_registered():
    from hf_softmask.strategies.naive import NaiveStrategy

    ncl, ft = get_strategy("ncl"), get_strategy("ft")
    assert isinstance(ncl, NaiveStrategy) and isinstance(ft, NaiveStrategy)  # the same plain training ...
    assert (ncl.config()["name"], ft.config()["name"]) == ("ncl", "ft")  # ... reported under its own name
