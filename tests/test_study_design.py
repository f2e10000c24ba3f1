"""The pre-training runner's evaluation by document and the study design it writes: held-out documents (ids in
results.json, disjoint from training, capped blocks each), seeds paired across rows, primary comparison and control
row declared in the config and checked before anything runs, wall time by stage, and runs saved before the
evaluation by document still resuming."""

from __future__ import annotations

import json

import pytest

from hf_softmask.continual import parse_config, run_continual_pretraining
from hf_softmask.continual.checkpointing import RunMismatchError
from hf_softmask.continual.pretraining.sweep import invocation
from hf_softmask.data import load_domains
from tests.testing_utils import tiny_runner_flags

RUNS = [
    {"name": "ncl", "strategy": "ncl", "learning_rates": [5e-4, 1e-3]},
    {"name": "ncl_control", "strategy": "ncl", "learning_rates": [7e-4]},
    {"name": "das", "strategy": "das", "learning_rates": [1e-3]},
]


def _flags(model_dir, out, **kw):
    """A tiny run evaluated on 3 documents per group (tiny_runner_flags' block cap lifted above their 6 blocks)."""
    base = {"max_steps": 2, "save_steps": 10, "max_eval_blocks": 100, "max_eval_docs": 3}
    return tiny_runner_flags(model_dir, out, **{**base, **kw})


def test_study_sweep_records_documents_seeds_design_and_stage_times(tiny_mlm_dir, tmp_path):
    out = tmp_path / "study"
    args = parse_config(
        _flags(
            tiny_mlm_dir,
            out,
            runs=json.dumps(RUNS),
            seeds="0,1",
            primary_comparison="das",
            control_run="ncl_control",
            bootstrap_resamples=50,
        )
    )
    payload = run_continual_pretraining(args)

    res = json.loads((out / "das_lr0.001_s1" / "results.json").read_text())
    domains = load_domains(["business", "sports"], max_train_docs=12, max_eval_docs=3, seed=args.seed)
    for j, d in enumerate(domains):
        docs = res["eval_block_docs"][j]
        assert sorted(set(docs)) == sorted(d.eval_ids) and len(d.eval_ids) == 3
        assert all(docs.count(x) <= 2 for x in d.eval_ids)  # eval_blocks_per_document = 2
        assert all(x.startswith(f"{d.name}/") and x.endswith(".txt") for x in docs)
        assert len(docs) == len(res["eval_block_losses"][0][j]) == len(res["eval_block_tokens"][j])
        assert not set(d.eval_texts) & set(d.train_texts)
    assert all(x.startswith("general/") for x in res["general_block_docs"])
    assert len(set(res["general_block_docs"])) == 3  # max_eval_docs caps general text too
    # every run of the study is evaluated on the same documents, whatever its seed or strategy
    other = json.loads((out / "ncl_lr0.0005_s0" / "results.json").read_text())
    assert other["eval_block_docs"] == res["eval_block_docs"] and other["seed"] == 0 and res["seed"] == 1
    # wall time by stage kind, per stage and in total
    assert len(res["stage_seconds"]) == 3 and set(res["stage_seconds_total"]) == {
        "train",
        "importance",
        "evaluation",
        "saving",
    }
    assert res["stage_seconds_total"]["train"] > 0 and res["stage_seconds"][1]["importance"] > 0  # DAS importance

    design = json.loads((out / "frontier.json").read_text())["design"]
    assert design == payload["design"] and design["resampling_unit"] == "document"
    assert design["seeds"] == [0, 1] and design["primary_rows"] == ["das@lr0.001"]
    assert design["control_row"] == "ncl_control" and design["frontier_learning_rates"] == [5e-4, 1e-3]
    assert design["evaluation_documents"]["domains"] == res["eval_block_docs"]
    assert design["command"] == invocation()  # this process's command line (here pytest's)
    rows = {(r["strategy"], r["lr"]): r for r in payload["runs"]}
    assert rows[("ncl_control", 7e-4)]["control"] and rows[("das", 1e-3)]["primary"]
    assert rows[("das", 1e-3)]["seeds"] == [0, 1]
    md = (out / "frontier.md").read_text()
    assert design["command"] in md and "adjusted verdict" in md

    # Rewriting the frontier of runs that lack the primary row is the user's mistake: one clear error, no traceback
    # (it used to escape as a bare ValueError).
    from hf_softmask.continual.cli import UserError

    rewrite = _flags(tiny_mlm_dir, tmp_path / "rewrite", runs=json.dumps(RUNS), primary_comparison="das")
    with pytest.raises(UserError, match="primary comparison 'das' names no complete row"):
        run_continual_pretraining(parse_config([*rewrite, "--frontier_runs", str(out / "ncl_lr*")]))


def test_primary_and_control_are_checked_before_anything_runs(tiny_mlm_dir, tmp_path):
    runs = json.dumps(RUNS)
    with pytest.raises(ValueError, match="--primary_comparison 'lora'"):
        parse_config(_flags(tiny_mlm_dir, tmp_path, runs=runs, primary_comparison="lora"))
    with pytest.raises(ValueError, match="runs at"):
        parse_config(_flags(tiny_mlm_dir, tmp_path, runs=runs, primary_comparison="das@4e-3"))
    with pytest.raises(ValueError, match="--control_run 'das'"):
        parse_config(_flags(tiny_mlm_dir, tmp_path, runs=runs, control_run="das"))
    on_grid = json.dumps([*RUNS[:1], {"name": "ctl", "strategy": "ncl", "learning_rates": [1e-3]}])
    with pytest.raises(ValueError, match="on the frontier"):
        parse_config(_flags(tiny_mlm_dir, tmp_path, runs=on_grid, control_run="ctl"))
    assert parse_config(_flags(tiny_mlm_dir, tmp_path, runs=runs, primary_comparison="das@lr0.001")).runs
    assert not any(tmp_path.iterdir())


def test_a_run_saved_before_evaluation_by_document_resumes_with_the_old_evaluation(tiny_mlm_dir, tmp_path):
    """A state.json written before eval_blocks_per_document / general_eval_fraction existed is read as holding the
    values that reproduce it (0 and 0.3): the same command with those values resumes; the new defaults are refused
    naming the setting."""
    out = tmp_path / "old"
    old = ["--eval_blocks_per_document", "0", "--general_eval_fraction", "0.3"]
    run_continual_pretraining(parse_config(_flags(tiny_mlm_dir, out, strategy="ncl") + old))
    state = json.loads((out / "state.json").read_text())
    for key in ("eval_blocks_per_document", "general_eval_fraction"):
        del state["fingerprint"][key]
    (out / "state.json").write_text(json.dumps(state))
    before = (out / "results.json").read_text()
    res = run_continual_pretraining(parse_config(_flags(tiny_mlm_dir, out, strategy="ncl") + old))
    assert res["complete"] and "eval_block_docs" not in res
    assert json.loads(before)["loss_matrix"] == res["loss_matrix"]
    with pytest.raises(RunMismatchError, match="eval_blocks_per_document"):
        run_continual_pretraining(parse_config(_flags(tiny_mlm_dir, out, strategy="ncl")))


def test_invocation_is_the_command_a_user_retypes(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(tmp_path / "scripts" / "continual_pretrain.py"), "--config", "a b.yaml"])
    assert invocation() == "python scripts/continual_pretrain.py --config 'a b.yaml'"
    monkeypatch.setattr("sys.argv", ["/x/site-packages/hf_softmask/__main__.py", "pretrain", "--seeds", "0,1"])
    assert invocation() == "python -m hf_softmask pretrain --seeds 0,1"


def test_sweep_shards_split_the_runs_and_the_last_writes_the_frontier(tiny_mlm_dir, tmp_path):
    """Two shards of one sweep (as two processes would run them): each trains every other run; the first to end
    writes no frontier (the other's runs are unfinished), the last writes it over all runs."""
    out = tmp_path / "sharded"
    flags = _flags(tiny_mlm_dir, out, strategies="ncl", learning_rates="5e-4,1e-3", seeds="0")
    first = run_continual_pretraining(parse_config([*flags, "--sweep_shard", "1/2"]))
    assert first == {} and not (out / "frontier.json").exists()
    assert sorted(p.name for p in out.iterdir() if (p / "results.json").is_file()) == ["ncl_lr0.001_s0"]
    last = run_continual_pretraining(parse_config([*flags, "--sweep_shard", "0/2"]))
    assert sorted(r["lr"] for r in last["runs"]) == [5e-4, 1e-3] and (out / "frontier.json").is_file()
    with pytest.raises(ValueError, match="--sweep_shard"):
        parse_config([*flags, "--sweep_shard", "2/2"])


def test_evaluation_before_training_is_computed_once_per_model_and_strategy(
    tiny_mlm_dir, tmp_path, monkeypatch, capsys
):
    """Plain training at two rates and two seeds: the first run evaluates before training and caches the row, the
    others read it (same weights, strategy and batches) and get exactly its numbers; DAS (another strategy, its own
    state) computes and caches its own."""
    monkeypatch.setenv("HF_SOFTMASK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "grid"
    flags = _flags(tiny_mlm_dir, out, strategies="ncl", learning_rates="5e-4,1e-3", seeds="0,1", max_steps=1)
    run_continual_pretraining(parse_config(flags))
    said = capsys.readouterr().out
    assert said.count("evaluation before training: read from the cache") == 3
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    assert len(rows) == 4 and all(r["initial_loss"] == rows[0]["initial_loss"] for r in rows)
    assert all(r["eval_block_losses"][0] == rows[0]["eval_block_losses"][0] for r in rows)
    assert len(list((tmp_path / "cache" / "base_evaluation").iterdir())) == 1
    run_continual_pretraining(parse_config(_flags(tiny_mlm_dir, tmp_path / "das", strategy="das", max_steps=1)))
    assert "read from the cache" not in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "base_evaluation").iterdir())) == 2
