"""Elastic weight consolidation (online form): a quadratic pull towards the weights of earlier tasks.

After each task the diagonal Fisher ``F_t`` of the model's own predictive distribution is estimated
on the task's data (labels sampled from the model, :func:`hf_softmask.baselines.fisher.fisher_diagonal`) and
accumulated, ``F <- gamma * F + F_t``, with the anchor ``theta* <- theta``. While training later
tasks the loss gets ``lambda / 2 * sum F (theta - theta*)^2``. Covers the parameters of the
transformers model the strategy acts on (in continual finetuning the shared backbone, not the
per-task heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..baselines.fisher import fisher_diagonal
from .base import ContinualStrategy
from .units import StrategyConfig, unit_model

__all__ = ["EWCConfig", "EWCStrategy"]


@dataclass
class EWCConfig(StrategyConfig):
    """Settings of :class:`EWCStrategy` (each may be passed as a keyword)."""

    ewc_lambda: float = field(
        default=1.0, metadata={"help": "lambda of the penalty lambda/2 * sum F (theta - theta*)^2."}
    )
    fisher_examples: int = field(
        default=64, metadata={"help": "Examples used to estimate each task's Fisher diagonal."}
    )
    per_example: bool = field(
        default=True, metadata={"help": "One backward per example (exact diagonal) or one per batch (cheaper)."}
    )
    normalize: bool = field(
        default=True,
        metadata={
            "help": "Divide each task's Fisher by its mean entry, so lambda does not depend on the "
            "model's gradient scale (lambda then weighs a mean-Fisher displacement)."
        },
    )
    gamma: float = field(
        default=1.0, metadata={"help": "Decay of the accumulated Fisher per task (1: plain sum over tasks)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the label sampling."})

    def __post_init__(self):
        super().__post_init__()
        if self.ewc_lambda < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.ewc_lambda}")
        if self.fisher_examples < 1:
            raise ValueError(f"fisher_examples must be >= 1, got {self.fisher_examples}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")


class EWCStrategy(ContinualStrategy):
    """Online EWC over the model's parameters (see the module docstring)."""

    name = "ewc"
    runners = ("pretrain", "finetune")
    changes_effective_lr = False
    config_class = EWCConfig

    def __init__(self, config: EWCConfig | None = None, **settings):
        super().__init__(config, **settings)
        self.task_id = -1
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.tasks_consolidated = 0
        self.last_penalty: float | None = None

    @staticmethod
    def _params(model: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters covered, named as in ``model.named_parameters()``."""
        # The Trainer's loss sees the wrapped model: torch.compile (outermost, as accelerate builds it) around DDP.
        # The compile wrapper is taken off first: given one, extract_model_from_parallel either lacks the option to
        # unwrap it (accelerate < 1.3) or by default puts the unwrapped model back inside it, dropping DDP.
        model = extract_model_from_parallel(getattr(model, "_orig_mod", model))
        inner = {id(p) for p in unit_model(model).parameters()}
        return {n: p for n, p in model.named_parameters() if id(p) in inner}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """``lambda / 2 * sum F (theta - theta*)^2`` (None before the first task is consolidated)."""
        if not self.fisher:
            return None
        params = self._params(model)
        total = None
        for name, F in self.fisher.items():
            p = params[name]
            F = F.to(p.device)
            term = (F * (p - self.anchor[name].to(p.device)).pow(2)).sum()
            total = term if total is None else total + term
        return 0.5 * self.cfg.ewc_lambda * total

    def extra_loss(self, model: nn.Module, inputs: dict, outputs) -> torch.Tensor | None:
        pen = self.penalty(model)
        if pen is not None:
            self.last_penalty = float(pen.detach())
        return pen

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        if dataloader is None:
            raise ValueError(
                "EWC estimates the Fisher on the task's data: "
                "pass a dataloader to after_task(model, task_id, dataloader)"
            )
        params = {n: p for n, p in self._params(model).items() if p.requires_grad}
        scores, seen = fisher_diagonal(
            model,
            dataloader,
            params,
            max_examples=self.cfg.fisher_examples,
            per_example=self.cfg.per_example,
            seed=self.cfg.seed + task_id,
            desc="EWC Fisher",
        )
        scores = {n: s / seen for n, s in scores.items()}
        if self.cfg.normalize:
            mean = sum(float(s.sum()) for s in scores.values()) / max(sum(s.numel() for s in scores.values()), 1)
            if mean > 0:
                scores = {n: s / mean for n, s in scores.items()}
        for name, F in scores.items():
            prev = self.fisher.get(name)
            self.fisher[name] = F if prev is None else self.cfg.gamma * prev.to(F.device) + F
            self.anchor[name] = params[name].detach().clone()
        self.tasks_consolidated += 1

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"fisher.{n}": f for n, f in self.fisher.items()}
        state.update({f"anchor.{n}": a for n, a in self.anchor.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[len("fisher.") :]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor.") :]: v for k, v in state.items() if k.startswith("anchor.")}

    def config(self) -> dict:
        return {**super().config(), "tasks_consolidated": self.tasks_consolidated}

    def load_pretrained(self, directory) -> None:
        super().load_pretrained(directory)
        self.tasks_consolidated = int((self.saved_config(directory) or {}).get("tasks_consolidated", 0))
