"""Both runners take TrainingArguments subclasses: Trainer flags reach every domain/task Trainer, refused ones stop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertModel, TrainerCallback

from hf_softmask.continual import ContinualPretrainer, ContinualPretrainingArguments, parse_config
from hf_softmask.continual.cli import check_process_group, help_text, runner_parsers
from hf_softmask.continual.finetuning import parse_finetuning_config, run_continual_finetuning
from tests.testing_utils import (
    MAIN_THEN_REPORT_PROCESS_GROUP,
    accelerate_launch_cmd,
    run_torch_only_processes,
    tiny_runner_flags,
)

ROOT = Path(__file__).resolve().parents[1]


def pretrain_flags(model_dir, out, **kw) -> list[str]:
    return tiny_runner_flags(
        model_dir,
        out,
        **{"per_device_train_batch_size": 2, "save_steps": 100, "logging_steps": 1, "strategy": "ncl", **kw},
    )


def finetune_flags(model_dir, out, **kw) -> list[str]:
    flags = {
        "model_name_or_path": str(model_dir),
        "strategy": "ft",
        "tasks": "business,entertainment politics,sports",
        "max_train_per_class": 4,
        "max_test_per_class": 4,
        "max_length": 32,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "num_threads": 1,
        "output_dir": str(out),
    }
    flags.update(kw)
    out_flags = []
    for k, v in flags.items():
        out_flags += [f"--{k}", *(str(v).split(" ") if k == "tasks" else [str(v)])]
    return out_flags


class Record(TrainerCallback):
    """What every Trainer of the run was given and did: settings, model flags, optimizer, learning rates."""

    def __init__(self):
        self.runs = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.runs.append(
            {
                "args": args,
                "checkpointing": getattr(model, "is_gradient_checkpointing", None),
                "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
                "lrs": [],
            }
        )

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kw):
        self.runs[-1]["lrs"].append(lr_scheduler.get_last_lr()[0])


def test_trainer_flags_reach_every_domain_trainer(tiny_mlm_dir, tmp_path):
    args = parse_config(
        pretrain_flags(
            tiny_mlm_dir,
            tmp_path / "run",
            bf16=None,
            gradient_checkpointing=None,
            optim="adafactor",
            gradient_accumulation_steps=2,
            lr_scheduler_type="cosine",
            warmup_steps=0.5,
            max_grad_norm=0.5,
            report_to="none",
        )
    )
    rec = Record()
    res = ContinualPretrainer(args, callbacks=[rec]).run()
    assert res["complete"] and len(rec.runs) == 2
    for run in rec.runs:  # every domain's Trainer
        a = run["args"]
        assert a.bf16 and a.gradient_checkpointing and a.gradient_accumulation_steps == 2 and a.max_grad_norm == 0.5
        assert a.max_steps == 4 and str(a.lr_scheduler_type.value) == "cosine"
        assert run["checkpointing"] is True and run["optimizer"] == "Adafactor"
    # the schedule (warm-up included) restarts at every domain: both domains see the same learning rates
    assert rec.runs[0]["lrs"] == rec.runs[1]["lrs"] and rec.runs[0]["lrs"][0] < rec.runs[0]["lrs"][1]
    assert [r["args"].run_name for r in rec.runs] == ["ncl/1_business", "ncl/2_sports"]


def test_report_to_reaches_the_trainer(tiny_mlm_dir, tmp_path):
    """report_to is no longer hard-coded to 'none': the Trainer of a domain is asked for the tracker given."""
    args = parse_config(pretrain_flags(tiny_mlm_dir, tmp_path / "run", report_to="tensorboard"))
    runner = ContinualPretrainer(args)
    assert runner._training_args("1_business", 0).report_to == ["tensorboard"]
    if shutil.which("tensorboard") is None:  # not installed here: the Trainer itself says so
        with pytest.raises(RuntimeError, match="(?i)tensorboard"):
            runner.run()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--deepspeed", "ds.json"], "FSDP2"),
        (["--resume_from_checkpoint", "x/checkpoint-2"], "resumes by itself"),
        (["--eval_strategy", "steps"], "evaluates every stage itself"),
        (["--load_best_model_at_end", "true"], "evaluates every stage itself"),
        (["--save_strategy", "best"], "save_strategy best"),
        (["--hub_strategy", "checkpoint"], "pushes each finished stage"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
        (["--max_steps", "-5"], "--max_steps"),
        (["--max_step", "3"], "max_step"),  # no abbreviation matching
    ],
)
def test_flags_that_cannot_apply_are_refused_by_both_runners(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        parse_config(["--output_dir", str(tmp_path / "p"), *flags])
    with pytest.raises(ValueError, match=message):
        parse_finetuning_config(["--output_dir", str(tmp_path / "f"), *flags])
    assert not (tmp_path / "p").exists() and not (tmp_path / "f").exists()


def test_finetuning_refuses_nonsense_epochs_and_steps(tmp_path):
    for flags, message in (
        (["--num_train_epochs", "-1"], "num_train_epochs"),
        (["--max_steps", "-5", "--num_train_epochs", "0"], "max_steps"),
        (["--pooling", "max"], "pooling"),
        (["--max_length", "0"], "max_length"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_finetuning_config(["--output_dir", str(tmp_path / "f"), *flags])


def test_yaml_old_names_still_read(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps_per_domain: 7\nwarmup_ratio: 0.25\nhub_private: true\n")
    args = parse_config(["--config", str(cfg)])
    assert args.max_steps == 7 and args.warmup_steps == 0.25 and args.hub_private_repo is True
    assert parse_config(["--max_steps_per_domain", "0"]).max_steps == -1


@pytest.mark.parametrize("script", ["continual_pretrain", "continual_finetune"])
def test_help_is_fast_current_and_honest(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0 and "--max_steps" in proc.stdout and "--bf16" in proc.stdout
    assert seconds < 3, f"--help took {seconds:.1f} s"
    types, prog = runner_parsers()[script]
    assert proc.stdout == help_text(types, prog), "stored help is stale: python -m hf_softmask.continual.cli"
    if script == "continual_pretrain":
        assert "--no_plots, --no-plots                Turn off --plots." in proc.stdout
        run_name = proc.stdout.split("--run_name RUN_NAME")[2].split("\n  --")[0]
        assert run_name.count("default") == 1  # one default, the true one


def test_finetune_optim_flag_builds_that_optimizer(tiny_bert_dir, tmp_path):
    """--optim was accepted and ignored (the runner built AdamW itself); now each task's optimizer follows it."""
    args = parse_finetuning_config(finetune_flags(tiny_bert_dir, tmp_path / "sgd", optim="sgd"))
    rec = Record()
    res = run_continual_finetuning(args, callbacks=[rec])
    assert [r["optimizer"] for r in rec.runs] == ["SGD", "SGD"] and res["world_size"] == 1
    from hf_softmask.continual.finetuning import build_optimizer
    from hf_softmask.task_heads import MultiTaskClassifier

    model = MultiTaskClassifier(BertModel.from_pretrained(tiny_bert_dir), [2, 2])
    assert isinstance(build_optimizer(model, 1e-3, 1e-2, 0.0, args), torch.optim.SGD)


def test_unjoined_processes_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        check_process_group("finetuning")


TORCH_ONLY_FINETUNE = """
import sys
import torch.distributed as dist
from hf_softmask.continual.finetuning import parse_finetuning_config, run_continual_finetuning

dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=int(sys.argv[2]), world_size=2)
try:
    run_continual_finetuning(parse_finetuning_config(sys.argv[3:]))
    print("TRAINED")
except ValueError as e:
    print("REFUSED", e)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_finetuning_refuses_a_process_group_accelerate_does_not_see(tiny_bert_dir, tmp_path):
    """Two processes joined by torch.distributed alone (no launcher variables): accelerate calls each the only one,
    so before the fix both trained alone into one directory, each as its main process."""
    worker = tmp_path / "worker.py"
    worker.write_text(TORCH_ONLY_FINETUNE)
    flags = finetune_flags(tiny_bert_dir, tmp_path / "run")
    procs = run_torch_only_processes(worker, lambda r: [str(tmp_path / "init"), str(r), *flags])
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
        out = p.stdout
        assert "REFUSED" in out and "accelerate launch" in out and "world size 2" in out, out[-2000:]
    assert not (tmp_path / "run" / "state.json").exists()  # refused before the directory was touched


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_under_accelerate_launch_on_cpu_trains_one_model(tiny_bert_dir, tmp_path):
    """Two processes without ACCELERATE_USE_CPU used to train two independent copies into one directory. Also: the
    script's main ends the process group (left to interpreter teardown, gloo aborts a finished run now and then)."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    worker = tmp_path / "worker.py"
    worker.write_text(MAIN_THEN_REPORT_PROCESS_GROUP)
    cmd = [
        *accelerate_launch_cmd(2),
        str(worker),
        str(ROOT / "scripts" / "continual_finetune.py"),
        str(tmp_path / "group"),
        *finetune_flags(tiny_bert_dir, tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["world_size"] == 2
    assert proc.stdout.count("'acc'") == 1  # the summary comes from the main process only
    assert [(tmp_path / f"group.{r}").read_text() for r in range(2)] == ["ended", "ended"]


def test_old_and_new_name_of_one_setting_together_are_refused(tmp_path):
    """One map of old names for both runners (hf_softmask.continual.renames): an old name sets the new field in
    YAML and as a flag, and a YAML giving both names is refused instead of one silently winning."""
    cfg = tmp_path / "both.yaml"
    cfg.write_text("warmup_ratio: 0.1\nwarmup_steps: 2\n")
    with pytest.raises(ValueError, match="warmup_ratio is the old name of warmup_steps: give only warmup_steps"):
        parse_config(["--config", str(cfg), "--output_dir", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="warmup_ratio is the old name of warmup_steps: give only warmup_steps"):
        parse_finetuning_config(["--config", str(cfg), "--output_dir", str(tmp_path / "f")])
    training_args = parse_finetuning_config(["--warmup_ratio", "0.2", "--output_dir", str(tmp_path / "f")])
    assert training_args.warmup_steps == 0.2
    cfg.write_text("max_steps_per_domain: 3\n")  # per domain: an old name of the pre-training runner only
    assert parse_config(["--config", str(cfg), "--output_dir", str(tmp_path / "p")]).max_steps == 3
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['max_steps_per_domain'\]"):
        parse_finetuning_config(["--config", str(cfg), "--output_dir", str(tmp_path / "f")])


def test_sweep_lists_are_lists(tmp_path):
    """learning_rates, seeds, strategies and frontier_runs are list fields: space-separated flags and YAML lists,
    the old comma form still read (numbers, seeds and names never hold a comma); a bad item names its flag."""
    out = ["--output_dir", str(tmp_path / "o"), "--no_plots"]
    spaced = parse_config(
        [*out, "--learning_rates", "1e-4", "5e-5", "--seeds", "0", "2", "--strategies", "ncl", "das"]
    )
    commas = parse_config([*out, "--learning_rates", "1e-4,5e-5", "--seeds=0,2", "--strategies", "ncl,das"])
    for args in (spaced, commas):
        assert args.learning_rates == [1e-4, 5e-5] and args.seeds == [0, 2] and args.strategies == ["ncl", "das"]
        assert [(e["strategy"], e["learning_rates"]) for e in args.sweep_entries()] == [
            ("ncl", [1e-4, 5e-5]),
            ("das", [1e-4, 5e-5]),
        ]
    for text in ("seeds: [0, 1, 2]\nlearning_rates: [1.0e-4]\n", 'seeds: "0,1,2"\nlearning_rates: "1e-4"\n'):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        args = parse_config(["--config", str(cfg), *out])
        assert args.seeds == [0, 1, 2] and args.seed_list() == [0, 1, 2] and args.learning_rates == [1e-4]
    assert parse_config([*out, "--config", str(cfg), "--seeds", "5"]).seeds == [5]  # the flag overrides the YAML
    assert parse_config(out).seeds is None and parse_config(out).learning_rates is None
    with pytest.raises(ValueError, match="--seeds .*integers"):
        ContinualPretrainingArguments(output_dir=str(tmp_path), plots=False, seeds=[0, 1.5])
    with pytest.raises(ValueError, match="learning_rates"):
        parse_config([*out, "--learning_rates", "1e-4,abc"])
    from hf_softmask.continual.comparison import parse_compare_args

    compare = parse_compare_args(["--strategies", "ncl", "hat", "--settings", "pretrain", "--frontier_lr_factors=1,2"])
    assert (compare.strategies, compare.settings, compare.frontier_lr_factors) == (
        ["ncl", "hat"],
        ["pretrain"],
        [1, 2],
    )
