"""The baselines wired into the pre-training runner (docs/baselines.md): a sweep over replay, WiSE-FT, LoRA and
freeze_bottom with two seeds writing a frontier with bootstrap intervals; replay batches of a runner domain mixed
at the ratio; WiSE-FT in the runner giving the interpolated weights; re-warming per domain; resume after a kill."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertForMaskedLM, TrainerCallback

from hf_softmask.baselines.replay import replay_rows_per_batch
from hf_softmask.continual import ContinualPretrainer, parse_config
from hf_softmask.continual.pretraining.runner import run_continual_pretraining
from tests.testing_utils import (
    straight_and_killed_then_resumed,
    tiny_runner_flags,
)


def _flags(model, out, **over):
    return tiny_runner_flags(model, out, **{"max_steps": 2, "save_steps": 100, **over})


def test_sweep_with_baselines_seeds_and_intervals(tiny_mlm_dir, tmp_path):
    runs = [
        {"name": "ncl", "strategy": "ncl", "learning_rates": [3e-3, 3e-4]},
        {"name": "replay_wise", "strategy": "ncl", "learning_rates": [1e-3], "replay_ratio": 0.5, "merge_alpha": 0.5},
        {"name": "lora", "strategy": "lora", "learning_rates": [1e-2], "strategy_kwargs": {"lora_rank": 2}},
        {
            "name": "freeze_bottom",
            "strategy": "freeze_bottom",
            "learning_rates": [1e-3],
            "strategy_kwargs": {"num_frozen_layers": 1},
        },
    ]
    out = tmp_path / "sweep"
    args = parse_config(
        _flags(
            tiny_mlm_dir, out, runs=json.dumps(runs), seeds="0,1", bootstrap_resamples=200, keep_domain_weights="last"
        )
    )
    payload = run_continual_pretraining(args)
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == sorted(
        f"{n}_lr{lr:g}_s{s}" for r in runs for n, lr in ((r["name"], v) for v in r["learning_rates"]) for s in (0, 1)
    )
    # seeds change training, not the evaluation blocks: paired intervals need the same blocks
    a, b = (json.loads((out / f"replay_wise_lr0.001_s{s}" / "results.json").read_text()) for s in (0, 1))
    assert a["seed"] == 0 and b["seed"] == 1 and a["eval_block_losses"][0] == b["eval_block_losses"][0]
    assert a["loss_matrix"] != b["loss_matrix"]
    assert a["settings"]["replay_ratio"] == 0.5 and a["merged_parameters"][0] > 0
    assert len(a["eval_block_losses"]) == 3 and len(a["general_block_losses"]) == 3  # before + 2 domains
    assert a["loss_matrix"][0][0] == pytest.approx(
        sum(v * n for v, n in zip(a["eval_block_losses"][1][0], a["eval_block_tokens"][0]))
        / sum(a["eval_block_tokens"][0])
    )
    assert payload["design"]["resamples"] == 200 and payload["design"]["seeds"] == [0, 1]
    recs = {r["strategy"]: r for r in payload["runs"] if r["strategy"] != "ncl"}
    assert set(recs) == {"replay_wise", "lora", "freeze_bottom"}
    for r in payload["runs"]:
        assert r["seeds"] == [0, 1] and len(r["run"]) == 2
        for m in ("in_domain_loss", "forgetting", "general_loss_increase"):
            ci = r["intervals"][m]
            assert ci["low"] <= ci["high"] and r[f"{m}_per_seed"] and len(r[f"{m}_per_seed"]) == 2
    for r in recs.values():
        gap = r["forgetting_gap"]
        # the flag is the adjusted verdict's; a raw "beyond" needs the whole interval below 0
        adjusted = gap["adjusted_verdict"]
        assert r["beyond_frontier"] == (None if adjusted is None else adjusted == "beyond")
        assert gap["verdict"] is None or (gap["verdict"] == "beyond") == (gap["high"] < 0)
        assert "general_gap" in r
    md = (out / "frontier.md").read_text()
    assert "raw 95% interval" in md and "adjusted verdict" in md and md.count("[") >= 3 * len(payload["runs"])


def test_replay_batches_of_a_runner_domain_mix_sources_at_the_ratio(tiny_mlm_dir, tmp_path):
    seen = []

    def hook(model):
        def record(module, args, kwargs):
            if module.training and "labels" in kwargs:
                seen.append((kwargs["input_ids"].clone(), kwargs["labels"].clone()))

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    ratio, batch = 0.5, 4
    args = parse_config(
        _flags(
            tiny_mlm_dir,
            tmp_path / "run",
            strategy="ncl",
            replay_ratio=ratio,
            replay_general="true",
            max_steps=3,
            per_device_train_batch_size=batch,
        )
    )
    runner = ContinualPretrainer(args, model_hook=hook)
    runner.run()
    data = runner.data
    sources = {"business": data.train[0], "sports": data.train[1], "general": data.general_train}

    def source_of(ids, labels):
        # Per-block MLM masks change only labelled positions: the other tokens identify the block.
        keep = labels == -100
        hits = [
            name
            for name, ds in sources.items()
            if any(torch.equal(ids[keep], torch.as_tensor(ds[i]["input_ids"])[keep]) for i in range(len(ds)))
        ]
        assert len(hits) == 1, hits
        return hits[0]

    assert len(seen) == 6  # 3 steps in each of 2 domains
    r = replay_rows_per_batch(ratio, batch)
    for step, (ids, labels) in enumerate(seen):
        counts = Counter(source_of(i, l) for i, l in zip(ids, labels))
        if step < 3:  # domain 1: its own rows, general text replayed
            assert counts == Counter({"business": batch - r, "general": r})
        else:  # domain 2: the replay rows go to business and general text in turn
            assert counts == Counter({"sports": batch - r, "business": 1, "general": 1})


class _AfterTraining(TrainerCallback):
    """The weights at the end of every domain's training, before the runner's WiSE-FT."""

    def __init__(self):
        self.weights = []

    def on_train_end(self, args, state, control, model=None, **kw):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})


def test_merge_alpha_in_the_runner_gives_the_interpolated_weights(tiny_mlm_dir, tmp_path):
    alpha = 0.3
    grab = _AfterTraining()
    out = tmp_path / "run"
    args = parse_config(_flags(tiny_mlm_dir, out, strategy="ncl", merge_alpha=alpha, learning_rate=1e-2))
    ContinualPretrainer(args, callbacks=[grab]).run()
    before = [dict(BertForMaskedLM.from_pretrained(tiny_mlm_dir).named_parameters())]
    saved = [
        dict(AutoModelForMaskedLM.from_pretrained(out / d).named_parameters()) for d in ("1_business", "2_sports")
    ]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    for k in range(2):
        prev = before[0] if k == 0 else saved[0]
        new = grab.weights[k][name]
        assert not torch.allclose(new, prev[name])  # the domain trained this weight
        torch.testing.assert_close(saved[k][name], alpha * new + (1 - alpha) * prev[name], rtol=0, atol=1e-6)


def test_learning_rate_rewarms_in_every_runner_domain(tiny_mlm_dir, tmp_path):
    args = parse_config(
        _flags(
            tiny_mlm_dir,
            tmp_path / "run",
            strategy="ncl",
            max_steps=4,
            warmup_steps=2,
            lr_scheduler_type="linear",
            logging_steps=1,
        )
    )
    runner = ContinualPretrainer(args)
    lrs = []

    class Log(TrainerCallback):
        def on_train_end(self, a, state, control, **kw):
            lrs.append([e["learning_rate"] for e in state.log_history if "learning_rate" in e])

    runner.callbacks.append(Log())
    runner.run()
    assert len(lrs) == 2 and len(lrs[0]) == 4 and lrs[1] == lrs[0]
    # logged after each step: warm-up over 2 steps to 1e-3, then linear decay to 0 at the domain's 4th step
    assert lrs[0] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_baseline_settings_refused_before_anything_is_written(tiny_mlm_dir, tmp_path):
    for over, msg in [
        ({"replay_ratio": 0.05}, "rounds to 0 replay rows"),
        ({"merge_alpha": 1.5}, "merge_alpha"),
        ({"replay_general": "true"}, "replay_general needs replay_ratio"),
        ({"seeds": "0,x"}, "--seeds"),
        ({"bootstrap_confidence": 1.0}, "bootstrap_confidence"),
        ({"runs": '[{"name": "a", "strategy": "ncl", "learning_rates": [1e-3], "bad": 1}]'}, "unknown key"),
        ({"strategies": "ncl", "runs": '[{"strategy": "ncl", "learning_rates": [1e-3]}]'}, "drop --strategies"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_config(_flags(tiny_mlm_dir, tmp_path / "x", **over))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_replay_merge_ema_run_killed_and_resumed_equals_uninterrupted(tiny_mlm_dir, tmp_path):
    resumed = straight_and_killed_then_resumed(
        tmp_path,
        lambda out: tiny_runner_flags(
            tiny_mlm_dir, out, strategy="ncl", replay_ratio=0.5, merge_alpha=0.5, ema_decay=0.5
        ),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "straight" / "state.json").read_text())["domains"]
    b = json.loads((tmp_path / "killed" / "state.json").read_text())["domains"]
    assert b[1]["resumed_from"] == "checkpoint-2"
    assert [d["eval_loss"] for d in a] == [d["eval_loss"] for d in b]
    assert [d["eval_blocks"] for d in a] == [d["eval_blocks"] for d in b]
