"""What a continual finetuning run measures: accuracy and macro-F1 of every task, and the run's results.json."""

from __future__ import annotations

import platform

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...evaluation.continual_metrics import summarize
from ..fingerprint import runner_fields

__all__ = ["evaluate_task", "evaluate_all", "finetuning_results"]


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, loader: DataLoader, metrics: dict) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model`` on ``loader`` (eval mode; mode restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, refs = [], []
    try:
        for batch in loader:
            labels = batch.pop("labels")
            batch = {k: v.to(device) for k, v in batch.items()}
            preds.extend(model(**batch).logits.argmax(-1).cpu().tolist())
            refs.extend(labels.tolist())
    finally:
        model.train(was_training)
    acc = metrics["accuracy"].compute(predictions=preds, references=refs)["accuracy"]
    f1 = metrics["f1"].compute(predictions=preds, references=refs, average="macro")["f1"]
    return {"accuracy": float(acc), "f1": float(f1)}


def evaluate_all(model, strategy, test_loaders, metrics, desc: str) -> list[dict]:
    """One row: every task ``j`` evaluated with ``strategy.set_task(j)`` (``set_task(None)`` after)."""
    row = []
    for j, loader in enumerate(tqdm(test_loaders, desc=desc, leave=False)):
        strategy.set_task(j)
        row.append(evaluate_task(model, loader, metrics))
    strategy.set_task(None)
    return row


def finetuning_results(args, tasks, strategy, done: list[dict], initial: list[dict]) -> dict:
    """The accuracy and F1 matrices with their summaries, and what the run was (``total_seconds`` set later).

    ``done``: the finished tasks' records from state.json (their evaluation ``row``, times, storage); ``initial``:
    the untrained model's row (for FWT).
    """
    rows = [d["row"] for d in done]
    acc_matrix = [[r["accuracy"] for r in row] for row in rows]
    f1_matrix = [[r["f1"] for r in row] for row in rows]
    storage = [d.get("storage_bytes") for d in done]
    return {
        "tasks": [t.name for t in tasks],
        "label_names": [t.label_names for t in tasks],
        "strategy": args.strategy,
        "accuracy_matrix": acc_matrix,
        "f1_matrix": f1_matrix,
        "initial_accuracy": [r["accuracy"] for r in initial],
        "initial_f1": [r["f1"] for r in initial],
        **summarize(acc_matrix, higher_is_better=True, random_init_scores=[r["accuracy"] for r in initial]),
        "f1_summary": summarize(f1_matrix, higher_is_better=True, random_init_scores=[r["f1"] for r in initial]),
        "strategy_config": strategy.config(),
        "storage_bytes_per_task": storage if any(s is not None for s in storage) else None,
        "train_seconds_per_task": [d["train_seconds"] for d in done],
        "resumed_tasks": [d["task"] for d in done if d.get("resumed_from")],
        "total_seconds": None,
        "arguments": {name: getattr(args, name) for name in runner_fields(args, ())},  # the runner's own fields
        "training": {
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "seed": args.seed,
        },
        "device": f"{args.device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
        "world_size": args.world_size,
    }
