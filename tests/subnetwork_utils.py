"""Helpers for the TSS/WSN/continual-finetuning tests: tiny multi-task classifiers trained with a real Trainer."""

from __future__ import annotations

import torch
from conftest import VOCAB
from torch.utils.data import DataLoader
from transformers import TrainingArguments

from hf_softmask.continual.finetune import build_optimizer
from hf_softmask.strategies import StrategyTrainer
from hf_softmask.task_heads import MultiTaskClassifier


def task_dataset(task_id: int, n: int = 24, seq_len: int = 12, num_labels: int = 2, seed: int = 0):
    """A learnable toy task: the label is decided by which token range dominates the sequence."""
    import datasets

    g = torch.Generator().manual_seed(1000 * seed + task_id)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    width = (VOCAB - 1) // num_labels
    ids = 1 + labels[:, None] * width + torch.randint(0, width, (n, seq_len), generator=g)
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": labels.tolist(),
            "task_ids": [task_id] * n,
        }
    ).with_format("torch")


def batch_of(dataset, k: int = 8) -> dict:
    rows = dataset[:k]
    return {key: rows[key] for key in ("input_ids", "attention_mask", "task_ids")}


def train_args(output_dir, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=2e-2,
        weight_decay=0.01,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    base.update(kw)
    return TrainingArguments(**base)


def train_task(model: MultiTaskClassifier, strategy, dataset, task_id: int, output_dir, head_lr: float = 1e-2, **args):
    """What the runner does for one task: select it, train its head + the strategy's parameters, then after_task."""
    model.set_task(task_id)
    model.train_only_head(task_id)
    loader = DataLoader(dataset, batch_size=8)
    strategy.before_task(model, task_id, loader)
    targs = train_args(output_dir, **args)
    opt = build_optimizer(model, targs.learning_rate, head_lr, targs.weight_decay)
    StrategyTrainer(model=model, args=targs, train_dataset=dataset, strategy=strategy, optimizers=(opt, None)).train()
    strategy.after_task(model, task_id, loader)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(**batch).logits.clone()
    finally:
        model.train(was)


def one_thread():
    """Generator body for an autouse fixture: tiny models run far faster on one thread of a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
