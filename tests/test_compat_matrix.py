"""Compatibility-matrix cells proven by real Trainer runs on tiny models (see hf_softmask/core/compatibility.py).

Each case trains a tiny Llama (2 layers, hidden 32, 4 heads) with one training feature on and asserts the row's
defining property, not only that training ran: protected slices unchanged (soft-masking, DAS with its contrastive
term, HAT's used units), the first task's outputs bit-identical after the second (TSS / WSN, on the finetuning
runner's MultiTaskClassifier over the tiny Llama), frozen entries unchanged (TaLoS), replacements done with finite
losses (CBP), a positive penalty (EWC / KD).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from hf_softmask import (
    MultiTaskClassifier,
    SoftMaskCallback,
    SoftMaskTrainer,
    SoftMaskTrainingArguments,
    UnitLayout,
)
from hf_softmask.continual.finetuning import build_optimizer
from hf_softmask.core.compatibility import MATRIX, UnsupportedSettingError
from hf_softmask.strategies import StrategyTrainer, get_strategy
from hf_softmask.strategies.cbp import CBPStrategy
from hf_softmask.strategies.das import DASStrategy
from hf_softmask.strategies.ewc import EWCStrategy
from hf_softmask.strategies.hat import HATStrategy
from hf_softmask.strategies.kd import KDStrategy
from hf_softmask.strategies.talos import TaLoSStrategy
from tests.test_hat import _owned_rows
from tests.test_peft import LLAMA_ALL, _half_importance, _moved, _protected
from tests.test_talos import _check_frozen_bit_identical, _snapshot
from tests.testing_utils import (
    batch_of,
    launch_cpu_processes,
    lm_dataset,
    logits,
    task_dataset,
    tiny_llama,
    train_args,
)

#: Each feature as a user turns it on: TrainingArguments flags, plus a CPU GradScaler / a PEFT wrapper where needed.
FEATURES = {
    "bf16": {"bf16": True},
    "fp16": {"fp16": True},
    "checkpointing": {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "accumulation": {"gradient_accumulation_steps": 2},
    "peft": {},
    # aot_eager: dynamo traces the hooks and autograd as inductor would, without its ~50 s of C++ codegen per case
    "compile": {"torch_compile": True, "torch_compile_backend": "aot_eager"},
}
# "ddp" (set in the 2-process worker below) adds no flag: accelerate launch makes the Trainer use DDP.


def _model(feature):
    model = tiny_llama(seed=0)
    if feature == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_ALL))
    return model


def _args(tmp_path, feature, cls=None, **kw):
    kw = {
        "max_steps": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "logging_steps": 1,
        "logging_strategy": "steps",
        **FEATURES[feature],
        **kw,
    }
    return train_args(tmp_path, cls=cls, **kw)


def _train(trainer, feature, first=True):
    if feature == "fp16":
        # accelerate makes no scaler on a CPU: hand it the CPU stand-in for CUDA's, as a CUDA fp16 run has.
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses), losses
    if feature == "checkpointing":  # the layers really ran checkpointed (a wrapper must pass the flag on)
        assert any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())
    if feature == "fp16":
        assert trainer.optimizer.scaler is trainer.accelerator.scaler
    if feature == "compile" and first:  # later Trainers on the same model: see the note of the compile cells
        assert type(trainer.model_wrapped).__name__ == "OptimizedModule", type(trainer.model_wrapped)
    return trainer


def _task(model, strategy, tmp_path, feature, task_id, seed, after=True, **kw):
    data = lm_dataset(n_batches=4, seq_len=12, seed=seed)
    loader = DataLoader(data, batch_size=4)
    strategy.before_task(model, task_id, loader)
    trainer = StrategyTrainer(
        model=model, args=_args(tmp_path / f"t{task_id}", feature, **kw), train_dataset=data, strategy=strategy
    )
    _train(trainer, feature, first=task_id == 0)
    if after:
        strategy.after_task(model, task_id, loader)
    return trainer


# -- rows ----------------------------------------------------------------------------------------------------------
def _softmask(tmp_path, feature, use_trainer):
    model = _model(feature)
    layout = UnitLayout.from_model(model)
    imp = _half_importance(layout)
    trainable = [s for s in layout.owned if s.param.requires_grad]
    before = {s.name: s.param.detach().clone() for s in trainable}
    data = lm_dataset(n_batches=4, seq_len=12)
    if use_trainer:
        trainer = SoftMaskTrainer(
            model=model,
            args=_args(tmp_path, feature, cls=SoftMaskTrainingArguments),
            train_dataset=data,
            importance=imp,
        )
    else:
        trainer = Trainer(
            model=model,
            args=_args(tmp_path, feature),
            train_dataset=data,
            callbacks=[SoftMaskCallback(imp, mode="update")],
        )
    _train(trainer, feature)
    for s in trainable:
        prot, moved = _protected(layout, s, imp), _moved(s, before)
        assert not moved[prot].any(), f"{s.name}: protected units moved"
        assert moved[~prot].any(), f"{s.name}: no free unit moved"
    return model


def row_softmask_callback(tmp_path, feature):
    return _softmask(tmp_path, feature, use_trainer=False)


def row_softmask_trainer(tmp_path, feature):
    return _softmask(tmp_path, feature, use_trainer=True)


def row_hat(tmp_path, feature):
    hat = HATStrategy()
    model = hat.prepare_model(_model(feature))
    _task(model, hat, tmp_path, feature, 0, seed=0)
    before = _snapshot(model)
    layout = UnitLayout.from_model(model)
    protected = _owned_rows(layout, hat.cum_heads, hat.cum_ffn)
    assert 0 < hat.cum_ffn.mean() < 1
    _task(model, hat, tmp_path, feature, 1, seed=1, after=False)
    free_moved = 0
    for name, p in model.named_parameters():
        if name in protected:
            sel = protected[name]
            assert torch.equal(p.detach()[sel], before[name][sel]), f"used units of {name} moved"
            free_moved += int((p.detach()[~sel] != before[name][~sel]).sum())
    assert free_moved > 0
    return [model, hat.state_dict()]  # the state: task embeddings and masks, which every replica must agree on


def row_cbp(tmp_path, feature):
    model = _model(feature)
    cbp = CBPStrategy(replacement_rate=0.05, maturity_threshold=1, decay_rate=0.9)
    model = cbp.prepare_model(model)
    _task(model, cbp, tmp_path, feature, 0, seed=0, after=False, weight_decay=0.0)
    assert float(cbp.num_replaced.sum()) > 0, "no unit was replaced"
    assert (cbp.age == 0).any() and torch.isfinite(cbp.utility).all()
    return model


def row_talos(tmp_path, feature):
    model = _model(feature)
    talos = TaLoSStrategy(keep_fraction=0.2, rounds=1, examples_per_round=8, train_task_head=False)
    before = _snapshot(model)
    _task(model, talos, tmp_path, feature, 0, seed=0, after=False)
    assert _check_frozen_bit_identical(model, before, talos) > 0
    return model


def row_ewc_kd(tmp_path, feature):
    models = []
    for strategy in (EWCStrategy(ewc_lambda=100.0, fisher_examples=8), KDStrategy(kd_weight=1.0)):
        model = strategy.prepare_model(_model(feature))
        _task(model, strategy, tmp_path / strategy.name, feature, 0, seed=0)
        _task(model, strategy, tmp_path / strategy.name, feature, 1, seed=1, after=False)
        term = strategy.last_penalty if strategy.name == "ewc" else strategy.last_kd_loss
        assert term is not None and math.isfinite(float(term)) and float(term) > 0, (strategy.name, term)
        models.append(model)
    return models


def row_das(tmp_path, feature):
    """A DAS domain: half the units at importance 1 (the accumulated importance the runner hands the next domain)."""
    model = _model(feature)
    layout = UnitLayout.from_model(model)
    das = DASStrategy(show_progress=False)
    das.importance = imp = _half_importance(layout)  # before_task then skips the general-importance pass
    trainable = [s for s in layout.owned if s.param.requires_grad]
    before = {s.name: s.param.detach().clone() for s in trainable}
    _task(model, das, tmp_path, feature, 0, seed=0, after=False)
    assert das.contrastive_losses and all(math.isfinite(x) for x in das.contrastive_losses)
    for s in trainable:
        prot, moved = _protected(layout, s, imp), _moved(s, before)
        assert not moved[prot].any(), f"{s.name}: protected units moved"
        assert moved[~prot].any(), f"{s.name}: no free unit moved"
    return model


def _finetune_task(model, strategy, tmp_path, feature, task_id, num_labels):
    """What the finetuning runner does for one task (tests/testing_utils.py's train_task), with the feature on."""
    data = task_dataset(task_id, num_labels=num_labels)
    model.set_task(task_id)
    model.train_only_head(task_id)
    loader = DataLoader(data, batch_size=8)
    strategy.before_task(model, task_id, loader)
    args = _args(tmp_path / f"t{task_id}", feature, max_steps=4, per_device_train_batch_size=8, weight_decay=0.01)
    opt = build_optimizer(model, args.learning_rate, 1e-2, args.weight_decay)
    _train(
        StrategyTrainer(model=model, args=args, train_dataset=data, strategy=strategy, optimizers=(opt, None)),
        feature,
        first=task_id == 0,
    )
    strategy.after_task(model, task_id, loader)
    return data


def row_tss_wsn(tmp_path, feature):
    """TSS and WSN: task 0's outputs are bit-identical after task 1 trained, and task 1 did change the model."""
    models = []
    for name, kw in (("tss", {}), ("wsn", {"keep_ratio": 0.5})):
        strategy = get_strategy(name, **kw)
        model = strategy.prepare_model(MultiTaskClassifier(_model(feature).model, [2, 3]))
        d0 = _finetune_task(model, strategy, tmp_path / name, feature, 0, num_labels=2)
        after0 = logits(model, batch_of(d0))
        scores = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        _finetune_task(model, strategy, tmp_path / name, feature, 1, num_labels=3)
        assert torch.equal(logits(model, batch_of(d0)), after0), f"{name}: task 0's outputs changed"
        moved = [n for n, p in model.named_parameters() if n in scores and not torch.equal(p.detach(), scores[n])]
        assert moved, f"{name}: task 1 trained nothing"
        models.append(model)
    return models


ROWS = {
    "SoftMaskCallback": row_softmask_callback,
    "SoftMaskTrainer": row_softmask_trainer,
    "DAS runner": row_das,
    "TSS/WSN runner": row_tss_wsn,
    "HAT": row_hat,
    "CBP": row_cbp,
    "TaLoS": row_talos,
    "EWC/KD": row_ewc_kd,
}


# Compile cases trace with dynamo (aot_eager backend: the graph capture that breaks on hooks, not the codegen):
# a few seconds each after the first; marked slow. The inductor backend itself is a GPU-check concern.
# Refused cells are not trained here: tests/test_compatibility.py checks that they refuse.
CASES = [
    pytest.param(row, feature, marks=[pytest.mark.slow] if feature == "compile" else [])
    for row in sorted(ROWS)
    for feature in sorted(FEATURES)
    if MATRIX[row][feature].status != "refused"
]


@pytest.mark.parametrize(("row", "feature"), CASES)
def test_cell(row, feature, tmp_path):
    ROWS[row](tmp_path, feature)


# -- DDP: one launch of 2 gloo processes runs several rows --------------------------------------------------------
DDP_ROWS = ("SoftMaskTrainer", "DAS runner", "TSS/WSN runner", "HAT", "CBP", "TaLoS", "EWC/KD")


def _ddp_worker(out: Path) -> None:
    """Inside ``accelerate launch`` (2 CPU processes): each row trains under DDP, or is refused at train begin;
    each rank writes the outcome and its final weights."""
    from safetensors.torch import save_file

    FEATURES["ddp"] = {}
    rank = int(os.environ["RANK"])
    outcome = {}
    for row in DDP_ROWS:
        slug = row.replace("/", "_")
        try:
            models = ROWS[row](out / slug, "ddp")
        except UnsupportedSettingError as e:
            outcome[row] = {"refused": str(e)}
            continue
        models = models if isinstance(models, list) else [models]
        named = [m.items() if isinstance(m, dict) else m.named_parameters() for m in models]
        params = {f"{i}.{n}": p.detach().contiguous() for i, pairs in enumerate(named) for n, p in pairs}
        save_file(params, str(out / f"{slug}.{rank}.safetensors"))
        outcome[row] = {"trained": True}
    (out / f"outcome{rank}.json").write_text(json.dumps(outcome))


@pytest.mark.slow
@pytest.mark.distributed
def test_rows_under_two_ddp_processes(tmp_path):
    """Rows that support DDP train with their property checked on every rank and identical replicas; the rest
    are refused at train begin on every rank with the matrix's message."""
    from safetensors.torch import load_file

    launch_cpu_processes(Path(__file__), tmp_path)
    outcomes = [json.loads((tmp_path / f"outcome{r}.json").read_text()) for r in range(2)]
    for row in DDP_ROWS:
        cell = MATRIX[row]["ddp"]
        got = [o[row] for o in outcomes]
        if cell.status == "refused":
            assert all(cell.message in g.get("refused", "") for g in got), (row, got)
            continue
        assert all(g.get("trained") for g in got), (row, got)
        slug = row.replace("/", "_")
        p0, p1 = (load_file(str(tmp_path / f"{slug}.{r}.safetensors")) for r in range(2))
        diverged = [n for n in p0 if not torch.equal(p0[n], p1[n])]
        assert not diverged, f"{row}: the DDP replicas diverged in {diverged[:4]}"


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
    from hf_softmask.continual import end_processes

    end_processes()
