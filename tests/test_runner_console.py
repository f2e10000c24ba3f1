"""What the pre-training runner tells its user: how it trains (processes, backend), what its model loading left fresh,
that the LM-head warm-up came from the cache, where the results are; and what it leaves behind (no `.trainer/`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hf_softmask.continual import ContinualPretrainer, parse_config
from hf_softmask.continual.model_loading import load_model_and_tokenizer
from tests.testing_utils import MAIN_THEN_REPORT_PROCESS_GROUP, accelerate_launch_cmd, tiny_runner_flags

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "continual_pretrain.py")


def _run(model_dir, out, capsys, **kw):
    """One in-process run of the runner; returns its console lines."""
    flags = tiny_runner_flags(model_dir, out, **{"max_steps": 1, "strategy": "ncl", "max_train_blocks": 12, **kw})
    ContinualPretrainer(parse_config(flags)).run()
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("[continual_pretrain]")]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_first_line_says_one_process_then_results_path_and_no_trainer_dir(tiny_mlm_dir, tmp_path, capsys):
    """The run used to end with four bare numbers and leave an empty .trainer/ behind; a rerun of a finished run
    said "resuming after 2_sports"."""
    out = tmp_path / "run"
    lines = _run(tiny_mlm_dir, out, capsys)
    assert lines[0] == "[continual_pretrain] trains with 1 process (no process group) on cpu"
    assert lines[-1].startswith("[continual_pretrain] done: in-domain loss ")
    assert f"results in {out / 'results.json'}" in lines[-1] and "forgetting" in lines[-1]
    assert (out / "results.json").is_file() and not (out / ".trainer").exists()

    again = _run(tiny_mlm_dir, out, capsys)  # every domain finished: nothing trains
    assert "[continual_pretrain] every domain is finished (last: 2_sports); nothing to train" in "\n".join(again)
    assert not any("resuming after" in line for line in again)


def test_fresh_mlm_head_is_one_line_not_transformers_load_report(tiny_bert_dir, capfd):
    """Loading an encoder without its MLM head (the shipped MiniLM) printed "checkpoint seem corrupted" and a table
    of MISSING keys that nothing explained."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # as a user's shell has it (the test session silences transformers)
    try:
        said = []
        model, _, mlm = load_model_and_tokenizer(str(tiny_bert_dir), "mlm", say=said.append)
    finally:
        hf_logging.set_verbosity(level)
    err = capfd.readouterr().err
    assert mlm and "seem corrupted" not in err and "LOAD REPORT" not in err
    assert len(said) == 1 and "no trained BertForMaskedLM head" in said[0] and "cls.*" in said[0]
    assert "--lm_head_warmup_steps fits them" in said[0]


def test_lm_head_warmup_is_cached_and_reused(tiny_mlm_dir, tmp_path, capsys, monkeypatch):
    """The 300-step warm-up of the main job was redone on every run. The second run loads the cached head (the same
    weights); a head planted in the cache entry proves it is read, not retrained; another learning rate is another
    entry."""
    monkeypatch.setenv("HF_SOFTMASK_CACHE", str(tmp_path / "cache"))
    kw = dict(lm_head_warmup_steps=3, domains="business")
    first = _run(tiny_mlm_dir, tmp_path / "a", capsys, **kw)
    entries = list((tmp_path / "cache" / "lm_head_warmup").iterdir())
    assert len(entries) == 1 and (entries[0] / "head.safetensors").is_file()
    assert any(f"kept in {entries[0]}" in line for line in first)

    second = _run(tiny_mlm_dir, tmp_path / "b", capsys, **kw)
    assert any(f"loaded from the cache {entries[0]}" in line for line in second)
    head = load_file(str(entries[0] / "head.safetensors"))
    base_a = load_file(str(tmp_path / "a" / "0_base" / "model.safetensors"))
    base_b = load_file(str(tmp_path / "b" / "0_base" / "model.safetensors"))
    assert set(head) and set(head) <= set(base_a)
    for name in base_a:
        assert base_a[name].equal(base_b[name]), name

    planted = {name: t + 0.25 for name, t in head.items()}
    save_file(planted, str(entries[0] / "head.safetensors"))
    _run(tiny_mlm_dir, tmp_path / "c", capsys, **kw)
    base_c = load_file(str(tmp_path / "c" / "0_base" / "model.safetensors"))
    for name, t in planted.items():
        assert base_c[name].equal(t), name

    _run(tiny_mlm_dir, tmp_path / "d", capsys, lm_head_warmup_lr=1e-2, **kw)
    assert len(list((tmp_path / "cache" / "lm_head_warmup").iterdir())) == 2


def test_single_process_launcher_asked_for_two_is_refused(tiny_mlm_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher); the runner
    trained alone without a word. It now stops at start naming the command that gives two."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        SCRIPT,
        *tiny_runner_flags(tiny_mlm_dir, tmp_path / "run", max_steps=1, strategy="ncl"),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "accelerate launch --multi_gpu --num_processes N" in proc.stderr
    assert not (tmp_path / "run" / "state.json").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_first_line_names_two_gloo_processes(tiny_mlm_dir, tmp_path):
    """Under a real 2-process launch (as tests/test_runner_ddp.py) the first console line says so, once."""
    worker = tmp_path / "worker.py"
    worker.write_text(MAIN_THEN_REPORT_PROCESS_GROUP)
    flags = tiny_runner_flags(tiny_mlm_dir, tmp_path / "run", domains="business", max_steps=1, strategy="ncl")
    launch = [*accelerate_launch_cmd(2), str(worker), SCRIPT, str(tmp_path / "group"), *flags]
    proc = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[continual_pretrain]")]
    expected = "[continual_pretrain] trains with 2 processes (DDP, gloo process group, joined by accelerate) on cpu"
    assert lines[0] == expected and proc.stdout.count("trains with") == 1
