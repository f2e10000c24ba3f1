"""Per-task classification heads on a shared backbone, with task-id routing inside ``forward``.

``MultiTaskClassifier(backbone, num_labels=[2, 2, 3])`` pools the backbone's last hidden state (mean over the
attention mask, the first token, or the last non-padding token) and applies head ``t`` to examples of task ``t``.
A batch may mix tasks: examples are grouped by task id, each group runs through the backbone with that task
selected (``backbone.set_task(t)`` when the backbone has one, e.g. a :class:`~hf_softmask.tss.SubnetworkModel`),
and the outputs are put back in batch order. Logits of a mixed batch are padded with ``-inf`` to the widest head.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .utils.io import atomic_save_safetensors, atomic_write_json

__all__ = ["MultiTaskClassifier", "POOLINGS", "TASK_HEADS_WEIGHTS", "TASK_HEADS_CONFIG"]

POOLINGS = ("mean", "first", "last")
TASK_HEADS_WEIGHTS = "task_heads.safetensors"
TASK_HEADS_CONFIG = "task_heads.json"


def _hidden_size(backbone: nn.Module) -> int:
    config = getattr(backbone, "config", None)
    for attr in ("hidden_size", "dim", "n_embd", "d_model"):
        if config is not None and getattr(config, attr, None):
            return int(getattr(config, attr))
    raise ValueError("cannot tell the backbone's hidden size from its config; pass hidden_size=")


class MultiTaskClassifier(nn.Module):
    """A backbone shared by all tasks and one linear head per task.

    Args:
        backbone: a transformers base model (``AutoModel``) or a wrapper of one that returns ``last_hidden_state``.
        num_labels: number of classes of each task, in task order.
        task_names: optional names (default ``task0``, ``task1``, ...).
        pooling: ``mean`` (attention-masked mean), ``first`` (CLS token) or ``last`` (last non-padding token).
        dropout: dropout on the pooled features before the head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_labels: Sequence[int],
        task_names: Sequence[str] | None = None,
        pooling: str = "mean",
        dropout: float = 0.1,
        hidden_size: int | None = None,
        seed: int | None = 0,
        label_names: Sequence[Sequence[str]] | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not num_labels or any(n < 2 for n in num_labels):
            raise ValueError(f"each task needs at least 2 labels, got num_labels={list(num_labels)}")
        self.backbone = backbone
        self.num_labels = [int(n) for n in num_labels]
        self.task_names = list(task_names) if task_names is not None else [f"task{t}" for t in range(len(num_labels))]
        if len(self.task_names) != len(self.num_labels):
            raise ValueError(f"{len(self.task_names)} task names for {len(self.num_labels)} tasks")
        # Class names per task (saved with the heads, so predictions can be read without the training data).
        self.label_names = (
            [list(map(str, n)) for n in label_names]
            if label_names is not None
            else [[str(c) for c in range(n)] for n in self.num_labels]
        )
        if [len(n) for n in self.label_names] != self.num_labels:
            raise ValueError(f"label_names {self.label_names} do not match num_labels {self.num_labels}")
        self.pooling = pooling
        self.hidden_size = hidden_size or _hidden_size(backbone)
        self.dropout = nn.Dropout(dropout)
        # Heads are drawn from one seeded generator, so the untrained heads used for the upper triangle of the
        # accuracy matrix (and for forward transfer) are reproducible.
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.heads = nn.ModuleList()
        for n in self.num_labels:
            head = nn.Linear(self.hidden_size, n)
            with torch.no_grad():
                bound = 1 / self.hidden_size**0.5
                head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
                head.bias.zero_()
            self.heads.append(head)
        self.current_task = 0
        self.config = getattr(backbone, "config", None)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    # -- task selection --------------------------------------------------------------------------
    def set_task(self, task: int) -> None:
        """Route unlabelled batches to ``task`` and select its subnetwork in the backbone (if it has one)."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task id {task} out of range for {self.num_tasks} tasks")
        self.current_task = task
        if hasattr(self.backbone, "set_task"):
            self.backbone.set_task(task)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """The Trainer's ``--gradient_checkpointing``: checkpoint the backbone's layers (the heads are linear)."""
        self.backbone.activation_checkpointing_enable(**kwargs)

    def train_only_head(self, task: int) -> None:
        """Make head ``task`` the only trainable head (the backbone's flags are left to the strategy)."""
        for t, head in enumerate(self.heads):
            head.requires_grad_(t == task)

    # -- forward ---------------------------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if self.pooling == "first":
            return hidden[:, 0]
        if self.pooling == "last":
            last = attention_mask.long().cumsum(1).argmax(1)
            return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def _task_logits(self, task: int, input_ids, attention_mask, backbone_kwargs) -> torch.Tensor:
        if hasattr(self.backbone, "set_task"):
            self.backbone.set_task(task)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **backbone_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.heads[task](self.dropout(self.pool(hidden, attention_mask)))

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        task_ids=None,
        return_dict: bool = True,
    ) -> SequenceClassifierOutput:
        """Logits of each example under its task's head; ``task_ids`` ([B] or int) default to ``current_task``."""
        if input_ids is None:
            raise ValueError("input_ids are required")
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        B = input_ids.shape[0]
        if task_ids is None:
            task_ids = torch.full((B,), self.current_task, dtype=torch.long, device=input_ids.device)
        task_ids = torch.as_tensor(task_ids, device=input_ids.device).long()
        if task_ids.dim() == 0:
            task_ids = task_ids.expand(B)
        tasks = task_ids.unique(sorted=True).tolist()
        bad = [t for t in tasks if not 0 <= t < self.num_tasks]
        if bad:
            raise ValueError(f"task ids {bad} out of range for {self.num_tasks} tasks")
        previous = self.current_task
        try:
            if len(tasks) == 1:
                logits = self._task_logits(tasks[0], input_ids, attention_mask, extra)
            else:
                width = max(self.num_labels[t] for t in tasks)
                logits = None
                for t in tasks:
                    idx = (task_ids == t).nonzero(as_tuple=True)[0]
                    sub = {k: v[idx] for k, v in extra.items()}
                    part = self._task_logits(
                        t, input_ids[idx], None if attention_mask is None else attention_mask[idx], sub
                    )
                    if logits is None:
                        logits = part.new_full((B, width), float("-inf"))
                    logits[idx, : part.shape[1]] = part
        finally:
            # Leave the backbone on the task it was on: a forward must not change which subnetwork trains next.
            if hasattr(self.backbone, "set_task") and (len(tasks) > 1 or tasks[0] != previous):
                self.backbone.set_task(previous)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).long())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # -- persistence -----------------------------------------------------------------------------
    def save_heads(self, directory: str | os.PathLike) -> None:
        """Write ``task_heads.safetensors`` and ``task_heads.json`` (atomically)."""
        directory = Path(directory)
        atomic_save_safetensors({k: v for k, v in self.heads.state_dict().items()}, directory / TASK_HEADS_WEIGHTS)
        atomic_write_json(
            directory / TASK_HEADS_CONFIG,
            {
                "num_labels": self.num_labels,
                "task_names": self.task_names,
                "label_names": self.label_names,
                "pooling": self.pooling,
                "hidden_size": self.hidden_size,
            },
        )

    @staticmethod
    def saved_heads_config(directory: str | os.PathLike) -> dict:
        path = Path(directory) / TASK_HEADS_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} holds no saved task heads")
        return json.loads(path.read_text())

    @classmethod
    def from_pretrained_heads(cls, backbone: nn.Module, directory: str | os.PathLike, **kwargs) -> MultiTaskClassifier:
        """A classifier over ``backbone`` with the heads saved in ``directory``."""
        from safetensors.torch import load_file

        cfg = cls.saved_heads_config(directory)
        model = cls(
            backbone,
            cfg["num_labels"],
            cfg["task_names"],
            pooling=cfg["pooling"],
            hidden_size=cfg["hidden_size"],
            label_names=cfg.get("label_names"),
            **kwargs,
        )
        model.heads.load_state_dict(load_file(str(Path(directory) / TASK_HEADS_WEIGHTS)))
        return model
