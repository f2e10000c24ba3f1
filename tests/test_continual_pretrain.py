"""The continual pre-training runner end to end on a tiny real model: checkpoints, results, resume, sweep."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from hf_softmask.continual import (
    ContinualPretrainingArguments,
    mark_beyond_frontier,
    parse_config,
    run_continual_pretraining,
)
from hf_softmask.core.importance import UnitImportance
from tests.testing_utils import RUNNER_KILL_WORKER, tiny_runner_flags

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(model_dir, out, **kw) -> list[str]:
    """Flags of a seconds-long run, with an LM-head warm-up and plots."""
    return tiny_runner_flags(model_dir, out, **{"lm_head_warmup_steps": 2, "plots": "true", **kw})


def test_yaml_config_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model_name_or_path: minilm\ndomains: [business, {name: mine, path: /tmp}]\n"
        "learning_rate: 3.0e-5\nsoftmask_mask_power: 2.0\n"
    )
    args = parse_config(["--config", str(cfg), "--learning_rate", "1e-4"])
    assert args.learning_rate == 1e-4 and args.softmask_mask_power == 2.0
    assert args.domains == ["business", {"name": "mine", "path": "/tmp"}]
    assert args.softmask_config().mask_power == 2.0
    cfg.write_text("learning_rat: 1.0\n")
    with pytest.raises(ValueError, match="unknown field"):
        parse_config(["--config", str(cfg)])
    with pytest.raises(ValueError, match="policy"):
        ContinualPretrainingArguments(softmask_norms="ignore")
    # the shipped default runs the shipped MiniLM with an LM-head warm-up
    default = parse_config(["--config", str(ROOT / "configs" / "default.yaml")])
    assert default.model_name_or_path == "minilm" and default.lm_head_warmup_steps > 0 and default.strategy == "das"


def test_sweep_writes_checkpoints_results_and_frontier(tiny_mlm_dir, tmp_path):
    """ncl and das at one learning rate: every domain dir loads, results have the documented shapes."""
    out = tmp_path / "sweep"
    args = parse_config(tiny_args(tiny_mlm_dir, out, strategies="ncl,das", learning_rates="1e-3", plots="false"))
    frontier = run_continual_pretraining(args)
    assert {r["strategy"] for r in frontier["runs"]} == {"ncl", "das"}
    for name in ("frontier.json", "frontier.md"):
        assert (out / name).is_file()
    assert not (out / "frontier.png").exists()  # --plots false: no PNG (write_frontier's own test draws it)

    run = out / "das_lr0.001"
    res = json.loads((run / "results.json").read_text())
    assert res["domains"] == ["business", "sports"] and res["complete"]
    for key in ("perplexity_matrix", "loss_matrix"):
        assert len(res[key]) == 2 and all(len(row) == 2 for row in res[key])
    assert len(res["general_perplexity"]) == 3  # before training + one per domain
    for key in ("forgetting", "bwt", "fwt", "in_domain_loss", "general_loss_increase"):
        assert isinstance(res[key], float)
    assert res["bwt"] == pytest.approx(-(res["loss_matrix"][1][0] - res["loss_matrix"][0][0]))

    d = run / "2_sports"
    model = AutoModelForMaskedLM.from_pretrained(d)
    assert AutoTokenizer.from_pretrained(d).vocab_size == model.config.vocab_size
    imp = UnitImportance.from_pretrained(d)
    general = UnitImportance.from_pretrained(run / "0_base")
    assert imp.heads.shape == (2, 4) and imp.ffn.shape == (2, 64)
    assert torch.all(imp.heads >= general.heads) and torch.all(imp.ffn >= general.ffn)  # EMax accumulation
    card = (d / "README.md").read_text()
    assert "business → sports" in card and "das" in card
    # ncl keeps no importance, but its checkpoints are complete too
    assert AutoModelForMaskedLM.from_pretrained(out / "ncl_lr0.001" / "1_business") is not None
    assert not UnitImportance.exists(out / "ncl_lr0.001" / "1_business")


def test_frontier_marks_only_runs_beyond_every_comparable_baseline():
    recs = [
        {"strategy": "ncl", "lr": 1e-4, "in_domain_loss": 2.0, "forgetting": 0.30},
        {"strategy": "ncl", "lr": 5e-5, "in_domain_loss": 2.2, "forgetting": 0.10},
        {"strategy": "das", "lr": 1e-4, "in_domain_loss": 2.1, "forgetting": 0.05},  # beats the only ncl at <= 2.1
        {"strategy": "das", "lr": 5e-5, "in_domain_loss": 2.3, "forgetting": 0.12},  # ncl 5e-5 forgets less
        {"strategy": "das", "lr": 1e-3, "in_domain_loss": 1.5, "forgetting": 0.01},  # no ncl run that good in-domain
        {"strategy": "das", "lr": 2e-3, "in_domain_loss": 2.1, "forgetting": 0.0, "complete": False},  # cut short
    ]
    marks = [r["beyond_frontier"] for r in mark_beyond_frontier(recs)]
    assert marks == [None, None, True, False, None, None]


def _digest(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.mark.slow
def test_resume_after_kill_does_not_retrain_finished_domain(tiny_mlm_dir, tmp_path):
    out = tmp_path / "run"
    worker = tmp_path / "worker.py"
    worker.write_text(RUNNER_KILL_WORKER)
    flags = tiny_args(tiny_mlm_dir, out, strategy="das")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, str(worker), "2_sports:2", *flags], env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert (out / "1_business").is_dir() and not (out / "2_sports").exists()
    assert (out / ".trainer" / "2_sports" / "checkpoint-2").is_dir()
    state = json.loads((out / "state.json").read_text())
    assert [d["domain"] for d in state["domains"]] == ["business"]
    first = _digest(out / "1_business")
    importance_before = UnitImportance.from_pretrained(out / "1_business")

    done = subprocess.run(
        [sys.executable, str(worker), "none", *flags], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digest(out / "1_business") == first  # neither retrained nor rewritten
    state = json.loads((out / "state.json").read_text())
    assert [d["domain"] for d in state["domains"]] == ["business", "sports"]
    assert state["domains"][1]["resumed_from"] == "checkpoint-2" and state["domains"][1]["steps"] == 4
    # the resumed domain started from the same accumulated importance
    final = UnitImportance.from_pretrained(out / "2_sports")
    assert torch.all(final.heads >= importance_before.heads)
    assert json.loads((out / "results.json").read_text())["complete"]
    assert not list(out.glob(".staging_*")) and not (out / ".trainer" / "2_sports").exists()
    for png in (
        "perplexity_matrix.png",
        "plots/importance_0_base.png",
        "plots/importance_1_business.png",
        "plots/importance_2_sports.png",
        "2_sports/importance.png",
    ):
        assert (out / png).stat().st_size > 0, png


def test_mlm_evaluation_is_deterministic(tiny_mlm_dir):
    from hf_softmask.continual import FixedEvalSet, lm_eval_loss
    from hf_softmask.data import build_lm_dataset, lm_data_collator

    tok = AutoTokenizer.from_pretrained(tiny_mlm_dir)
    model = AutoModelForMaskedLM.from_pretrained(tiny_mlm_dir)
    ds = build_lm_dataset(["the markets rose again today as shares in banks gained"] * 8, tok, block_size=16)
    collator = lm_data_collator(tok, mlm=True)
    a = FixedEvalSet("x", ds, collator, batch_size=4, seed=1)
    b = FixedEvalSet("x", ds, collator, batch_size=4, seed=1)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a.batches, b.batches))
    torch.manual_seed(123)
    first = lm_eval_loss(model, a, causal=False)
    torch.manual_seed(456)  # the global RNG no longer matters
    assert lm_eval_loss(model, a, causal=False) == first
    c = FixedEvalSet("x", ds, collator, batch_size=4, seed=2)
    assert any(not torch.equal(x["labels"], y["labels"]) for x, y in zip(a.batches, c.batches))
