"""The baselines combined as the runner will call them, over two domains with StrategyTrainer: replay with DAS
(protected units still frozen, batches mixed), LoRA + EMA + WiSE-FT (final weights = the hand interpolation of
the merged adapter model), and the learning-rate schedule restarting (re-warming) in each domain."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import default_data_collator

from hf_softmask.baselines.domain_training import DomainTraining, DomainTrainingOptions
from hf_softmask.baselines.replay import ReplayMixture
from hf_softmask.core.importance import UnitImportance
from hf_softmask.core.masking import SoftMaskConfig
from hf_softmask.strategies import StrategyTrainer, get_strategy
from tests.testing_utils import ExampleDataset, tiny_bert, tiny_llama, train_args


def _band_rows(band, n, seq=12, seed=0):
    """Rows whose tokens lie in [1 + 40 * band, 41 + 40 * band): the domain of a row is read off its tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1 + 40 * band, 41 + 40 * band, (n, seq), generator=g)
    return ExampleDataset([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}])


def _run_domains(model, strategy, extras, train_sets, tmp_path, steps=2, batch=4, **args):
    """The runner's per-domain call sequence (hf_softmask.baselines.domain_training module docstring)."""
    seen, starts, weights = [], [], []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((len(weights), kw["input_ids"].clone())), with_kwargs=True
    )
    for k in range(len(train_sets)):
        starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        extras.before_domain(model)
        strategy.before_task(model, k, None)
        train_set = extras.train_dataset(k, train_sets, batch_size=batch, seed=0, num_batches=steps)
        targs = train_args(
            tmp_path / f"d{k}",
            per_device_train_batch_size=batch,
            max_steps=steps,
            **extras.training_overrides(train_set),
            **args,
        )
        StrategyTrainer(
            model=model, args=targs, train_dataset=train_set, strategy=strategy, callbacks=extras.callbacks()
        ).train()
        strategy.after_task(model, k, None)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        extras.after_domain(model)
    hook.remove()
    return seen, starts, weights


def test_lora_with_ema_and_wise_ft_over_two_domains(tmp_path):
    model = tiny_llama()
    names = [n for n, _ in model.named_parameters()]
    extras = DomainTraining(replay_ratio=0.5, merge_alpha=0.4, ema_decay=0.5)
    strategy = get_strategy("lora", lora_rank=2)
    seen, starts, after_task = _run_domains(
        model,
        strategy,
        extras,
        [_band_rows(0, 16), _band_rows(1, 16, seed=1)],
        tmp_path,
        learning_rate=5e-2,
        weight_decay=0.0,
    )
    before_d1 = starts[1]
    assert [n for n, _ in model.named_parameters()] == names
    # domain 2's batches: 2 rows of domain 2, 2 replayed rows of domain 1; domain 1 trained alone (nothing to replay)
    for k, ids in seen:
        bands = Counter(int(row[0] - 1) // 40 for row in ids)
        assert bands == (Counter({0: 4}) if k == 0 else Counter({1: 2, 0: 2})), (k, bands)
    # final weights: 0.4 * (merged LoRA model with the EMA adapter) + 0.6 * (weights before domain 2), in fp32
    for name, p in model.named_parameters():
        want = 0.4 * after_task[1][name] + 0.6 * before_d1[name]
        if torch.equal(after_task[1][name], before_d1[name]):
            want = before_d1[name]
        assert torch.equal(p.detach(), want), name
    assert any(not torch.equal(after_task[1][n], before_d1[n]) for n in names)  # the second domain did change weights


def test_das_with_replay_keeps_protected_units_and_mixes_batches(tmp_path):
    model = tiny_bert(seed=1)
    strategy = get_strategy("das", softmask=SoftMaskConfig(mode="update"), contrastive_weight=1.0)
    batches = [b for b in [default_data_collator([_band_rows(1, 8)[i] for i in range(4)])]]
    strategy.before_task(model, 1, batches)
    heads, ffn = strategy.importance.heads.clone(), strategy.importance.ffn.clone()
    heads[0], ffn[0], heads[1], ffn[1] = 1.0, 1.0, 0.0, 0.0  # protect layer 0 completely
    strategy.importance = UnitImportance(heads, ffn)
    extras = DomainTraining(replay_ratio=0.25, replay_general=True)
    train_set = extras.train_dataset(
        1,
        [_band_rows(0, 8), _band_rows(1, 8, seed=1)],
        _band_rows(2, 8, seed=2),
        batch_size=8,
        seed=0,
        num_batches=3,
        names=["a", "b"],
    )
    assert isinstance(train_set, ReplayMixture) and train_set.source_names == ["a", "general"]
    q0 = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    args = train_args(
        tmp_path, max_steps=3, per_device_train_batch_size=8, weight_decay=0.0, **extras.training_overrides(train_set)
    )
    StrategyTrainer(model=model, args=args, train_dataset=train_set, strategy=strategy).train()
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, q0)
    assert len(strategy.contrastive_losses) == 3
    # the model's forward also runs for DAS's contrastive views: every call in a step sees the same mixed batch
    for ids in seen:
        assert Counter(int(row[0] - 1) // 40 for row in ids) == Counter({1: 6, 0: 1, 2: 1})


def test_learning_rate_rewarms_each_domain(tmp_path):
    model = tiny_llama()
    lrs = []
    for k in range(2):
        targs = train_args(
            tmp_path / f"d{k}",
            max_steps=4,
            learning_rate=1e-3,
            warmup_steps=0.5,
            lr_scheduler_type="linear",
            logging_strategy="steps",
            logging_steps=1,
        )
        trainer = StrategyTrainer(
            model=model, args=targs, train_dataset=_band_rows(0, 16), strategy=get_strategy("ncl")
        )
        trainer.train()
        lrs.append([e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e])
    assert len(lrs[0]) == 4 and lrs[1] == lrs[0]  # the second domain starts its own warm-up and decay
    assert lrs[0][0] < max(lrs[0]) and lrs[0][-1] < max(lrs[0])


def test_options_validated():
    with pytest.raises(ValueError, match="replay_general needs replay_ratio"):
        DomainTrainingOptions(replay_general=True)
    with pytest.raises(ValueError, match="merge_alpha"):
        DomainTrainingOptions(merge_alpha=1.2)
    with pytest.raises(ValueError, match="ema_decay"):
        DomainTrainingOptions(ema_decay=1.0)
    with pytest.raises(RuntimeError, match="before_domain"):
        DomainTraining(merge_alpha=0.5).after_domain(tiny_llama())
    assert DomainTraining().callbacks() == [] and DomainTraining().after_domain(tiny_llama()) == 0


@pytest.mark.parametrize("name", ["cpu_study", "cpu_small", "cpu_estimators", "gpu_h100"])
def test_experiment_configs_parse_with_the_runner_and_every_run_validates(name):
    """The runner's own parser reads the config (unknown keys are refused there); every run of its sweep gives
    settings that validate (strategy declares pretrain and accepts its strategy_kwargs, replay/merge overrides)."""
    from pathlib import Path

    from hf_softmask.continual.pretraining.config import parse_config
    from hf_softmask.strategies.registry import strategy_class

    path = Path(__file__).parent.parent / "configs" / "experiments" / f"{name}.yaml"
    args = parse_config(["--config", str(path)])
    study = name in ("cpu_study", "gpu_h100")  # the calibrated design (docs/statistics.md); the others superseded
    assert args.runs and args.runs[0]["name"] == "ncl" and args.seed_list() == ([0, 1, 2] if study else [0])
    if study:
        grid = args.runs[0]["learning_rates"]
        assert max(b / a for a, b in zip(grid, grid[1:])) <= 2**0.5 * 1.001  # a dense frontier
        assert args.primary_comparison == "das" and args.control_run == "ncl_control"
        assert args.eval_blocks_per_document == 2 and args.max_eval_docs >= 32 and args.max_eval_blocks is None
        control = next(e for e in args.runs if e["name"] == "ncl_control")["learning_rates"]
        assert grid[0] < min(control) and max(control) < grid[-1]  # off the grid, inside its range
    else:
        assert args.eval_blocks_per_document == 0 and args.general_eval_fraction == 0.3  # reproduce old numbers
    labels = []
    for entry in args.sweep_entries():
        for lr in entry["learning_rates"]:
            run = args.for_entry(entry, lr)
            assert run.learning_rate == lr and run.run_name == entry["name"] and run.runs is None
            cls = strategy_class(run.strategy)
            assert "pretrain" in cls.runners
            kwargs = json.loads(run.strategy_kwargs) if run.strategy_kwargs else {}
            cls(**kwargs)
            run.domain_training_options()
        labels.append(entry["name"])
    assert len(set(labels)) == len(labels)
    controls = [e for e in args.runs if json.loads(args.for_entry(e, 1e-4).strategy_kwargs or "{}").get("estimator")]
    if name != "cpu_small":  # the old CPU baselines' control row is in cpu_estimators (the 30-minute budget)
        assert any(e["name"] == "das_random" and e["strategy"] == "das" for e in controls)
    if name == "cpu_estimators":
        # Its shared settings are cpu_small's, so the runs both configs name are the same runs (reused, not rerun).
        small = parse_config(["--config", str(path.parent / "cpu_small.yaml")])
        shared = {e["name"]: e for e in small.runs}
        for entry in args.runs:
            if entry["name"] in shared:
                assert entry == shared[entry["name"]]
                for lr in entry["learning_rates"]:
                    assert args.for_entry(entry, lr).fingerprint() == small.for_entry(entry, lr).fingerprint()
        estimators = {json.loads(args.for_entry(e, 1e-4).strategy_kwargs or "{}").get("estimator") for e in args.runs}
        assert {"gate_fisher", "activation", "wanda", "random"} <= estimators
        return
    replayed = [e for e in args.runs if e.get("replay_ratio")]
    assert {e["strategy"] for e in replayed} == {"ncl", "das"}  # replay alone, and DAS + replay
    if name == "gpu_h100":
        assert len(args.domains) == 3 and args.block_size == 256 and args.per_device_train_batch_size == 16
        assert args.bf16 and args.max_steps == 60
