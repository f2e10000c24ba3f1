"""Helpers shared by the strategy tests: a real StrategyTrainer run on tiny in-memory data."""

from __future__ import annotations

import torch
from conftest import random_lm_batches
from torch.utils.data import DataLoader, Dataset
from transformers import TrainingArguments

from hf_softmask.strategies import StrategyTrainer

# Two cores shared by several processes: more than one intra-op thread spins and runs ~100x slower.
torch.set_num_threads(1)


class ExampleDataset(Dataset):
    """Examples (dicts of 1-D tensors) cut from whole batches."""

    def __init__(self, batches):
        self.examples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def lm_dataset(n_batches=4, batch_size=4, seq_len=16, seed=0):
    return ExampleDataset(random_lm_batches(n_batches, batch_size, seq_len, seed))


def train_args(output_dir, **kw):
    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def run_task(model, strategy, dataset, output_dir, task_id, optimizers=(None, None), after=True, **args):
    """before_task -> StrategyTrainer.train() -> after_task, like the continual runners do."""
    loader = DataLoader(dataset, batch_size=args.get("per_device_train_batch_size", 4))
    strategy.before_task(model, task_id, loader)
    trainer = StrategyTrainer(
        model=model,
        args=train_args(output_dir, **args),
        train_dataset=dataset,
        strategy=strategy,
        optimizers=optimizers,
    )
    trainer.train()
    if after:
        strategy.after_task(model, task_id, loader)
    return trainer


@torch.no_grad()
def logits_of(model, batches):
    model.eval()
    out = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])
    return out
