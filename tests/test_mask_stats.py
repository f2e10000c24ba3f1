"""Mask statistics for report_to: mean mask of heads and FFN (overall and per layer) and the fraction of units with
importance > 0.5, logged at the Trainer's logging steps by SoftMaskCallback and by StrategyTrainer (DAS, HAT); the
per-layer detail goes to the report_to integrations only, the console and log_history get the bounded summary."""

import pytest
import torch
from transformers import Trainer

from hf_softmask import SoftMaskCallback, UnitImportance, UnitLayout
from hf_softmask.core.masking import SoftMaskConfig, SoftMasker, mask_statistics
from hf_softmask.strategies import ContinualStrategy, StrategyTrainer
from tests.test_core_masking import _args
from tests.testing_utils import ExampleDataset, random_lm_batches, tiny_llama


def _hand_made_importance(layout):
    heads = torch.tensor([[0.0, 1.0, 0.5, 0.75], [1.0, 1.0, 0.25, 0.0]])
    ffn = torch.zeros(2, layout.ffn_size)
    ffn[0, :16] = 1.0  # 16 of 64 neurons fully important in layer 0
    ffn[1, :] = 0.5  # exactly 0.5 is not > 0.5
    return UnitImportance(heads, ffn)


# Hand computation: mean of 1 - I over all units and per layer; fractions of units with I > 0.5.
SUMMARY = {
    "softmask/mask_mean_heads": (1 + 0 + 0.5 + 0.25 + 0 + 0 + 0.75 + 1) / 8,
    "softmask/mask_mean_ffn": (48 + 32) / 128,
    "softmask/frac_importance_gt_0.5_heads": 4 / 8,
    "softmask/frac_importance_gt_0.5_ffn": 16 / 128,
    "softmask/frac_importance_gt_0.5_all": (4 + 16) / (8 + 128),
}
EXPECTED = {
    **SUMMARY,
    "softmask/mask_mean_heads/layer_0": (1 + 0 + 0.5 + 0.25) / 4,
    "softmask/mask_mean_heads/layer_1": (0 + 0 + 0.75 + 1) / 4,
    "softmask/mask_mean_ffn/layer_0": 48 / 64,
    "softmask/mask_mean_ffn/layer_1": 0.5,
    "softmask/frac_importance_gt_0.5_heads": 4 / 8,
    "softmask/frac_importance_gt_0.5_ffn": 16 / 128,
    "softmask/frac_importance_gt_0.5_all": (4 + 16) / (8 + 128),
}


def test_mask_statistics_by_hand():
    layout = UnitLayout.from_model(tiny_llama())
    stats = mask_statistics(_hand_made_importance(layout))
    assert set(stats) == set(EXPECTED)
    for k, v in EXPECTED.items():
        assert stats[k] == pytest.approx(v), k
    # mask_power enters the mean mask: 1 - 0.5**2 = 0.75 for the 0.5 units of FFN layer 1
    assert mask_statistics(_hand_made_importance(layout), mask_power=2.0)[
        "softmask/mask_mean_ffn/layer_1"
    ] == pytest.approx(0.75)


def _train_logs(trainer_cls, callbacks, tmp_path, **trainer_kw):
    data = ExampleDataset(random_lm_batches(4, batch_size=4, seq_len=12, seed=3))
    trainer = trainer_cls(
        model=trainer_kw.pop("model"),
        args=_args(tmp_path, logging_strategy="steps", logging_steps=2),
        train_dataset=data,
        callbacks=callbacks,
        **trainer_kw,
    )
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


def _assert_logged(records, steps=True, expected=SUMMARY):
    """Every record holds exactly the ``expected`` mask statistics (no per-layer key beyond them)."""
    assert [r["step"] for r in records] == [2, 4] if steps else len(records) == 2
    for r in records:
        assert {k for k in r if k.startswith("softmask/")} == set(expected), r.get("step")
        for k, v in expected.items():
            assert r[k] == pytest.approx(v), (r.get("step"), k)


def test_softmask_callback_logs_mask_statistics_at_logging_steps(tmp_path):
    model = tiny_llama()
    imp = _hand_made_importance(UnitLayout.from_model(model))
    _assert_logged(_train_logs(Trainer, [SoftMaskCallback(imp)], tmp_path, model=model))


class _MaskingStrategy(ContinualStrategy):
    """The smallest strategy that soft-masks through ``self._masker``, as DAS and HAT do."""

    def __init__(self, importance):
        self.importance = importance
        self._masker = None

    def on_train_begin(self, model, optimizer):
        self._masker = SoftMasker(model, self.importance, SoftMaskConfig()).attach(optimizer)

    def on_train_end(self, model, optimizer):
        self._masker.detach()
        self._masker = None


def test_strategy_trainer_logs_mask_statistics_before_report_to(tmp_path):
    """StrategyTrainer adds them in Trainer.log, i.e. before the report_to integrations see the logs."""
    from transformers import TrainerCallback

    model = tiny_llama()
    imp = _hand_made_importance(UnitLayout.from_model(model))
    seen = []

    class FirstInLine(TrainerCallback):  # stands in for a report_to integration: it runs before user callbacks
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                seen.append(dict(logs))

    data = ExampleDataset(random_lm_batches(4, batch_size=4, seq_len=12, seed=3))
    trainer = StrategyTrainer(
        model=model,
        args=_args(tmp_path, logging_strategy="steps", logging_steps=2),
        train_dataset=data,
        strategy=_MaskingStrategy(imp),
    )
    trainer.callback_handler.callbacks.insert(0, FirstInLine())
    trainer.train()
    _assert_logged([r for r in trainer.state.log_history if "loss" in r])
    _assert_logged(seen, steps=False, expected=EXPECTED)  # integrations get the per-layer detail (and no step key)


def test_softmask_trainer_hands_mask_statistics_to_report_to_integrations(tmp_path):
    from transformers import TrainerCallback

    from hf_softmask import SoftMaskTrainer, SoftMaskTrainingArguments

    model = tiny_llama()
    imp = _hand_made_importance(UnitLayout.from_model(model))
    seen = []

    class Integration(TrainerCallback):  # where report_to integrations sit: before user callbacks
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                seen.append(dict(logs))

    data = ExampleDataset(random_lm_batches(4, batch_size=4, seq_len=12, seed=3))
    args = _args(tmp_path, cls=SoftMaskTrainingArguments, logging_strategy="steps", logging_steps=2)
    trainer = SoftMaskTrainer(model=model, args=args, train_dataset=data, importance=imp)
    trainer.callback_handler.callbacks.insert(1, Integration())
    trainer.train()
    _assert_logged([r for r in trainer.state.log_history if "loss" in r])
    _assert_logged(seen, steps=False, expected=EXPECTED)


def test_console_lines_carry_the_summary_not_one_key_per_layer(tmp_path, capsys):
    """A 30-layer SmolLM2 put ~63 softmask keys on every printed log line; the printer now gets the 5 summary keys,
    whatever the depth, while log_history keeps the same summary."""
    import ast

    model = tiny_llama()
    imp = _hand_made_importance(UnitLayout.from_model(model))
    data = ExampleDataset(random_lm_batches(4, batch_size=4, seq_len=12, seed=3))
    trainer = StrategyTrainer(
        model=model,
        args=_args(tmp_path, logging_strategy="steps", logging_steps=2, disable_tqdm=True),  # PrinterCallback
        train_dataset=data,
        strategy=_MaskingStrategy(imp),
    )
    trainer.train()
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 2
    for line in printed:
        assert {k for k in line if k.startswith("softmask/")} == set(SUMMARY)
