"""Precision refusals read the precision the Trainer's accelerator really uses, not only ``--fp16`` / ``--bf16``.

``accelerate launch --mixed_precision fp16`` (or an accelerate config) sets ``ACCELERATE_MIXED_PRECISION``;
``TrainingArguments`` then carries ``mixed_precision="fp16"`` with ``fp16=False``, and the Trainer's accelerator
runs fp16 with a GradScaler. Before the fix the check read only ``args.fp16``/``args.bf16`` and HAT trained.
"""

from __future__ import annotations

import pytest

from hf_softmask.core.compatibility import (
    COLUMNS,
    MATRIX,
    ROWS,
    UnsupportedSettingError,
    check_supported,
    detect_features,
    live_accelerator_state,
    training_precision,
)
from tests.test_compatibility import _trainers
from tests.testing_utils import lm_dataset, tiny_llama, train_args

PRECISIONS = ("fp16", "bf16")
#: every refused cell whose column is a precision (today HAT / fp16)
PRECISION_REFUSALS = [(r, c) for r in ROWS for c in PRECISIONS if MATRIX[r][c].status == "refused"]


def test_there_is_a_precision_refusal_to_check():
    assert ("HAT", "fp16") in PRECISION_REFUSALS


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_precision_reads_the_accelerate_environment(precision, monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert training_precision(train_args(tmp_path)) == "no"
    assert training_precision(train_args(tmp_path, **{precision: True})) == precision
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)  # what accelerate launch --mixed_precision sets
    args = train_args(tmp_path)
    assert not args.fp16 and not args.bf16
    assert training_precision(args) == precision
    assert precision in detect_features(args)


def test_training_precision_takes_the_accelerators_own(monkeypatch, tmp_path):
    from transformers import Trainer

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    plain = train_args(tmp_path / "plain")
    trainer = Trainer(model=tiny_llama(), args=train_args(tmp_path, bf16=True), train_dataset=lm_dataset(1))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert training_precision(plain) == "no" and training_precision(plain, trainer.accelerator) == "bf16"
    # what the callbacks read inside train(): the state every Accelerator of the process shares
    assert training_precision(plain, live_accelerator_state()) == "bf16"
    assert "bf16" in detect_features(plain, accelerator=trainer.accelerator)


@pytest.mark.parametrize(("row", "col"), [pytest.param(r, c, id=f"{r}-{c}") for r, c in PRECISION_REFUSALS])
def test_precision_refusal_from_the_accelerate_environment(row, col, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", col)
    args = train_args(tmp_path, max_steps=1)  # no --fp16 / --bf16: only the environment says it
    with pytest.raises(UnsupportedSettingError, match=rf"{row} does not support") as e:
        check_supported(row, args)
    assert MATRIX[row][col].message in str(e.value) and COLUMNS[col] in str(e.value)
    # the row's real Trainer refuses at train begin, before a step
    made = 0
    for make in _trainers(row, args, col):
        trainer = make()
        with pytest.raises(UnsupportedSettingError) as e:
            trainer.train()
        assert MATRIX[row][col].message in str(e.value)
        assert trainer.accelerator.mixed_precision == col and trainer.state.global_step == 0
        made += 1
    assert made
