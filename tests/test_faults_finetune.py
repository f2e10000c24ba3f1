"""Fault injection for the finetuning runner: per-task checkpoints, exact resume, refusals that name the fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from hf_softmask.continual.checkpointing import DamagedRunError, RunMismatchError
from hf_softmask.continual.finetuning import parse_finetuning_config, run_continual_finetuning
from hf_softmask.task_heads import MultiTaskClassifier


class Killed(BaseException):
    """Stands for SIGKILL (no handler in the runner catches it)."""


def _parse(model_dir, out, strategy="ft", *extra):
    return parse_finetuning_config(
        [
            "--model_name_or_path",
            str(model_dir),
            "--strategy",
            strategy,
            "--tasks",
            "business,entertainment",
            "politics,sports",
            "tech,entertainment",
            "--max_train_per_class",
            "4",
            "--max_test_per_class",
            "4",
            "--max_length",
            "32",
            "--per_device_eval_batch_size",
            "8",
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-3",
            "--num_threads",
            "1",
            "--output_dir",
            str(out),
            *extra,
        ]
    )


def _kill_at(event, task):
    def events(kind, **info):
        if kind == event and info.get("name") == task:
            raise Killed(f"{event} {task}")

    return events


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ft", "tss"])
@pytest.mark.parametrize("event", ["evaluated", "published", "state_saved"])
def test_killed_sequence_resumes_after_the_last_finished_task(tiny_bert_dir, tmp_path, strategy, event):
    """The runner used to have no per-task checkpoint: a killed sequence started over."""
    ref = run_continual_finetuning(_parse(tiny_bert_dir, tmp_path / "ref", strategy))
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_continual_finetuning(_parse(tiny_bert_dir, out, strategy), events=_kill_at(event, "2_politics_vs_sports"))
    state = json.loads((out / "state.json").read_text())
    done_before = [d["task"] for d in state["domains"]]
    res = run_continual_finetuning(_parse(tiny_bert_dir, out, strategy))
    assert res["accuracy_matrix"] == ref["accuracy_matrix"] and res["f1_matrix"] == ref["f1_matrix"]
    state = json.loads((out / "state.json").read_text())
    assert [d["task"] for d in state["domains"]] == ref["tasks"]
    assert done_before == (ref["tasks"][:2] if event == "state_saved" else ref["tasks"][:1])
    assert not list(out.glob(".staging_*")) and len([p for p in out.glob("[0-9]_*") if p.is_dir()]) == 1
    # label names are saved with the heads and in results.json
    heads = MultiTaskClassifier.saved_heads_config(out / "final")
    assert heads["label_names"] == [["business", "entertainment"], ["politics", "sports"], ["tech", "entertainment"]]
    assert res["label_names"] == heads["label_names"]


class KillAfterSave(TrainerCallback):
    """Kills the run once the Trainer checkpoint of ``step`` of task directory ``name`` is written."""

    def __init__(self, name: str, step: int):
        self.name, self.step = name, step

    def on_save(self, args, state, control, **kw):
        if args.output_dir.endswith(self.name) and state.global_step >= self.step:
            raise Killed(f"after checkpoint-{self.step} of {self.name}")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["hat", "cbp"])
def test_killed_inside_a_task_resumes_with_the_checkpoints_strategy_state(tiny_bert_dir, tmp_path, strategy):
    """HAT's embeddings and annealing position and CBP's utilities move every step: a rerun that resumed inside a
    task from the Trainer checkpoint continued from the task's starting state (other accuracies) before
    StrategyTrainer restored the state saved in the checkpoint."""
    from safetensors.torch import load_file

    extra = ["--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "2"]
    if strategy == "cbp":
        extra += ["--strategy_kwargs", '{"maturity_threshold": 1, "replacement_rate": 0.2}']
    ref = run_continual_finetuning(_parse(tiny_bert_dir, tmp_path / "ref", strategy, *extra))
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_continual_finetuning(
            _parse(tiny_bert_dir, out, strategy, *extra), callbacks=[KillAfterSave("2_politics_vs_sports", 2)]
        )
    res = run_continual_finetuning(_parse(tiny_bert_dir, out, strategy, *extra))
    state = json.loads((out / "state.json").read_text())
    assert state["domains"][1]["resumed_from"] == "checkpoint-2"
    assert res["accuracy_matrix"] == ref["accuracy_matrix"]
    a, b = (
        load_file(str(d / "3_tech_vs_entertainment" / "strategy_state.safetensors")) for d in (tmp_path / "ref", out)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetuning_owns_its_directory(tiny_bert_dir, tmp_path):
    """A second run with other settings, or a pre-training directory, used to be overwritten silently."""
    out = tmp_path / "run"
    args = _parse(tiny_bert_dir, out, "ft", "--max_steps", "1")
    run_continual_finetuning(args)
    with pytest.raises(RunMismatchError, match="other settings.*learning_rate"):
        run_continual_finetuning(_parse(tiny_bert_dir, out, "ft", "--max_steps", "1", "--learning_rate", "5e-4"))
    run_continual_finetuning(
        _parse(
            tiny_bert_dir, out, "ft", "--max_steps", "1", "--learning_rate", "5e-4", "--overwrite_output_dir", "true"
        )
    )
    assert json.loads((out / "results.json").read_text())["training"]["learning_rate"] == 5e-4


def test_corrupted_task_checkpoint_names_the_file(tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_continual_finetuning(
            _parse(tiny_bert_dir, out, "ft", "--max_steps", "1"),
            events=_kill_at("state_saved", "1_business_vs_entertainment"),
        )
    f = out / "1_business_vs_entertainment" / "model_state.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DamagedRunError, match="model_state.safetensors is damaged.*--overwrite_output_dir"):
        run_continual_finetuning(_parse(tiny_bert_dir, out, "ft", "--max_steps", "1"))
    (out / "state.json").write_text('{"fingerprint": ')
    with pytest.raises(DamagedRunError, match="state.json is damaged"):
        run_continual_finetuning(_parse(tiny_bert_dir, out, "ft", "--max_steps", "1"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
        (["--num_train_epochs", "-1"], "--num_train_epochs"),
        (["--strategy_kwargs", "{bad"], "--strategy_kwargs must be a JSON object"),
    ],
)
def test_bad_settings_refused_before_anything_is_written(tiny_bert_dir, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_continual_finetuning(_parse(tiny_bert_dir, tmp_path / "run", "ft", *extra))
    assert not (tmp_path / "run").exists()


def test_missing_model_path_is_named(tmp_path):
    args = _parse(Path("/no/such/dir"), tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="--model_name_or_path /no/such/dir: no such directory"):
        run_continual_finetuning(args)
    assert not (tmp_path / "run").exists()
