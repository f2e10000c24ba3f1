"""The continual finetuning runner: real BBC task sequences, real Trainer runs, results on disk."""

from __future__ import annotations

import json

import pytest

from hf_softmask.continual.finetuning import (
    ContinualFinetuningArguments,
    parse_finetuning_config,
    run_continual_finetuning,
)
from tests.testing_utils import one_thread

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

RESULT_KEYS = {"tasks", "accuracy_matrix", "f1_matrix", "acc", "bwt", "fwt", "forgetting"}


def run(tiny_bert_dir, out, strategy, **kw):
    args = ContinualFinetuningArguments(
        model_name_or_path=str(tiny_bert_dir),
        strategy=strategy,
        tasks=["business,entertainment", "politics,sports,tech"],
        max_train_per_class=6,
        max_test_per_class=4,
        max_length=32,
        per_device_eval_batch_size=16,
        **kw,
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=6,
        learning_rate=5e-3,
        use_cpu=True,
        seed=0,
    )
    return run_continual_finetuning(args)


def _check_results_files(out, results):
    saved = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(saved)
    assert saved["tasks"] == ["business_vs_entertainment", "politics_vs_sports_vs_tech"]
    for key in ("accuracy_matrix", "f1_matrix"):
        M = saved[key]
        assert len(M) == 2 and all(len(r) == 2 for r in M)
        assert all(0.0 <= v <= 1.0 for r in M for v in r)  # upper triangle filled too
    assert saved["fwt"] is not None
    assert (out / "accuracy_matrix.png").stat().st_size > 1000
    assert saved == json.loads(json.dumps(results))


def test_tss_run_has_zero_forgetting_and_saves_its_subnetworks(tiny_bert_dir, tmp_path):
    results = run(tiny_bert_dir, tmp_path, "tss", strategy_kwargs='{"init_score": 0.01}')
    _check_results_files(tmp_path, results)
    A = results["accuracy_matrix"]
    assert results["bwt"] == 0.0 and results["forgetting"] == 0.0  # task 0 is evaluated bit-identically after task 1
    assert A[1][0] == A[0][0]
    scored = 2 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 64)  # q, k, v, attention output, FFN in/out per layer
    assert results["storage_bytes_per_task"] == [scored // 8, scored // 8]
    final = tmp_path / "final"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "task_heads.safetensors",
        "task_heads.json",
        "strategy_config.json",
        "tokenizer_config.json",
    ):
        assert (final / name).is_file(), name


def test_ft_baseline_run_saves_the_whole_backbone(tiny_bert_dir, tmp_path):
    results = run(tiny_bert_dir, tmp_path, "ft")
    _check_results_files(tmp_path, results)
    assert results["storage_bytes_per_task"] is None
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "final" / "task_heads.safetensors").is_file()


def test_config_yaml_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        'strategy: wsn\nstrategy_kwargs: {keep_ratio: 0.3}\ntasks: ["business,tech", "sports,politics"]\n'
        "learning_rate: 1.0e-4\noutput_dir: %s\n" % (tmp_path / "o")
    )
    args = parse_finetuning_config(["--config", str(cfg), "--learning_rate", "3e-4", "--max_length", "48"])
    assert args.strategy == "wsn" and args.strategy_settings() == {"keep_ratio": 0.3}
    assert args.task_topics() == [["business", "tech"], ["sports", "politics"]]
    assert args.learning_rate == 3e-4 and args.max_length == 48
    bad = tmp_path / "bad.yaml"
    bad.write_text("stratgy: tss\n")
    with pytest.raises(ValueError, match="unknown field"):
        parse_finetuning_config(["--config", str(bad)])


def test_bad_strategy_kwargs_are_reported():
    with pytest.raises(ValueError, match="JSON object"):
        ContinualFinetuningArguments(strategy_kwargs="[1, 2]").strategy_settings()


def test_one_arguments_class_and_the_old_names(tmp_path):
    """Finetuning has one TrainingArguments subclass like pre-training; its old names still work for one release."""
    from transformers import TrainingArguments

    args = parse_finetuning_config(["--output_dir", str(tmp_path), "--per_device_eval_batch_size", "5"])
    assert isinstance(args, TrainingArguments) and args.per_device_eval_batch_size == 5
    with pytest.warns(FutureWarning, match="--eval_batch_size .* old name of --per_device_eval_batch_size"):
        assert (
            parse_finetuning_config(
                ["--output_dir", str(tmp_path), "--eval_batch_size", "7"]
            ).per_device_eval_batch_size
            == 7
        )
    cfg = tmp_path / "old.yaml"
    cfg.write_text("eval_batch_size: 9\n")
    with pytest.warns(FutureWarning, match="eval_batch_size"):
        assert (
            parse_finetuning_config(["--config", str(cfg), "--output_dir", str(tmp_path)]).per_device_eval_batch_size
            == 9
        )

    import hf_softmask
    from hf_softmask.continual import finetune as old

    with pytest.warns(FutureWarning, match="ContinualFinetuningArguments"):
        assert hf_softmask.ContinualFinetuneTrainingArguments is ContinualFinetuningArguments
    with pytest.warns(FutureWarning, match="ContinualFinetuningArguments"):
        assert old.ContinualFinetuneArguments is ContinualFinetuningArguments
    with pytest.warns(FutureWarning, match="parse_finetuning_config"):
        a, b = old.parse_finetune_config(["--output_dir", str(tmp_path)])
    assert a is b
    with pytest.raises(TypeError, match="one ContinualFinetuningArguments"), pytest.warns(FutureWarning):
        old.run_continual_finetune(a, ContinualFinetuningArguments(output_dir=str(tmp_path)))
