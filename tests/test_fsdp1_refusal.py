"""FSDP1 (flat parameters) is refused with a message naming FSDP2, never a KeyError/IndexError in the layout, and
the compatibility check tells FSDP1 from FSDP2 by the version really used (before: any ``--fsdp`` was FSDP2).

The models are really wrapped by torch's ``FullyShardedDataParallel`` in a one-process gloo group (on the CPU it
needs ``device_id=cpu``); before the fix ``UnitLayout`` failed with ``KeyError`` on the first weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer

from hf_softmask import MultiTaskClassifier, SoftMaskCallback, UnitImportance, UnitLayout
from hf_softmask.core.compatibility import (
    COLUMNS,
    MATRIX,
    ROWS,
    STRATEGY_ROWS,
    USE_FSDP2,
    UnsupportedSettingError,
    check_supported,
    detect_features,
    fsdp_version,
)
from hf_softmask.strategies import StrategyTrainer, get_strategy
from tests.testing_utils import lm_dataset, tiny_llama, train_args


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group for FSDP1, ended after the test (nothing leaks into later tests)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _fsdp1(module, use_orig_params=False):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(module, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


#: UnitLayout's own refusal (any component that builds a layout)
LAYOUT_REFUSAL = "UnitLayout cannot work on a model wrapped by FSDP1"


def _refuses_fsdp1(error: Exception, row: str | None = None) -> bool:
    """The layout's refusal (naming FSDP2), or the row's FSDP1 cell of the matrix."""
    text = str(error)
    if LAYOUT_REFUSAL in text:
        return USE_FSDP2 in text
    return row is not None and MATRIX[row]["fsdp1"].message in text and COLUMNS["fsdp1"] in text


@pytest.mark.parametrize("use_orig_params", [False, True], ids=["flat", "orig_params"])
def test_layout_refuses_an_fsdp1_model_before_indexing_it(gloo_group, use_orig_params):
    model = _fsdp1(tiny_llama(), use_orig_params)
    with pytest.raises(UnsupportedSettingError) as e:
        UnitLayout.from_model(model)
    assert _refuses_fsdp1(e.value) and "_fsdp_wrapped_module" in str(e.value)
    assert fsdp_version(model=model) == 1
    used = detect_features(model=model)
    assert "fsdp1" in used and "fsdp2" not in used and "ddp" not in used
    for row in ROWS:
        with pytest.raises(UnsupportedSettingError) as e:
            check_supported(row, model=model)
        assert MATRIX[row]["fsdp1"].message in str(e.value) and COLUMNS["fsdp1"] in str(e.value)


def test_softmask_callback_under_a_trainer_refuses_an_fsdp1_model(gloo_group, tmp_path):
    importance = UnitImportance.zeros_like_layout(UnitLayout.from_model(tiny_llama()))
    trainer = Trainer(
        model=_fsdp1(tiny_llama()),
        args=train_args(tmp_path, max_steps=1),
        train_dataset=lm_dataset(n_batches=2, seq_len=12),
        callbacks=[SoftMaskCallback(importance)],
    )
    with pytest.raises(UnsupportedSettingError) as e:
        trainer.train()
    assert MATRIX["SoftMaskCallback"]["fsdp1"].message in str(e.value) and trainer.state.global_step == 0


@pytest.mark.parametrize("name", sorted(STRATEGY_ROWS))
def test_every_strategy_with_a_row_refuses_an_fsdp1_model(gloo_group, tmp_path, name):
    """prepare_model, before_task and training as the runners call them: the first that sees FSDP1 refuses."""
    data = lm_dataset(n_batches=2, seq_len=12)
    strategy = get_strategy(name)
    if name in ("tss", "wsn"):  # the finetuning runner's multi-task classifier over the wrapped backbone
        model = MultiTaskClassifier(_fsdp1(tiny_llama().model), [2])
    else:
        model = _fsdp1(tiny_llama())
    with pytest.raises(UnsupportedSettingError) as e:
        model = strategy.prepare_model(model)
        strategy.before_task(model, 0, DataLoader(data, batch_size=4))
        StrategyTrainer(
            model=model, args=train_args(tmp_path, max_steps=1), train_dataset=data, strategy=strategy
        ).train()
    assert _refuses_fsdp1(e.value, STRATEGY_ROWS[name]), str(e.value)


def test_fsdp_version_follows_the_arguments_and_the_accelerate_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    assert fsdp_version(train_args(tmp_path)) is None
    for version, column, other in ((1, "fsdp1", "fsdp2"), (2, "fsdp2", "fsdp1")):
        args = train_args(tmp_path, fsdp="full_shard", fsdp_config={"version": version})
        assert fsdp_version(args) == version
        used = detect_features(args)
        assert column in used and other not in used
    # accelerate launch --use_fsdp (an accelerate config with distributed_type FSDP): version 1 unless given
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_version(train_args(tmp_path)) == 1 and "fsdp1" in detect_features(train_args(tmp_path))
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_version(train_args(tmp_path)) == 2
    assert fsdp_version() is None  # no run to read it from: only a model would say


@pytest.mark.parametrize("runner", ["pretrain", "finetune"])
def test_both_runners_refuse_fsdp1_at_parse_time_and_take_fsdp2(runner, monkeypatch, tmp_path):
    from hf_softmask.continual import parse_config
    from hf_softmask.continual.finetuning import parse_finetuning_config

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_VERSION", raising=False)

    def parse(*flags):
        argv = ["--output_dir", str(tmp_path / runner), *flags]
        return parse_config(argv) if runner == "pretrain" else parse_finetuning_config(argv)

    with pytest.raises(ValueError, match="FSDP1") as e:
        parse("--fsdp", "full_shard", "--fsdp_config", '{"version": 1}')
    assert USE_FSDP2 in str(e.value)
    parse("--fsdp", "full_shard", "--fsdp_config", '{"version": 2}')  # FSDP2: accepted
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp, no --fsdp_version 2
    with pytest.raises(ValueError, match="FSDP1"):
        parse()
    monkeypatch.setenv("FSDP_VERSION", "2")
    parse()
