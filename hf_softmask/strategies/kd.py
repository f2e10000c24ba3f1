"""Knowledge distillation to the model as it was at the end of the previous task.

A frozen copy of the model (the one strategy here that keeps a teacher copy) is taken after each task.
While training the next task the loss gets ``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``:
over every attended token's vocabulary logits for a language model, and, for the continual finetuning
runner's multi-head classifier, over the logits of every earlier task's head on the current inputs
(learning without forgetting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import ContinualStrategy
from .units import StrategyConfig

__all__ = ["KDConfig", "KDStrategy", "distillation_kl"]


@dataclass
class KDConfig(StrategyConfig):
    """Settings of :class:`KDStrategy` (each may be passed as a keyword)."""

    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term."})
    kd_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of teacher and student (the term is scaled by T^2)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kd_weight < 0:
            raise ValueError(f"kd_weight must be >= 0, got {self.kd_weight}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the last dim, averaged over the (masked) rest."""
    t = temperature
    s_logp = F.log_softmax(student.float() / t, -1)
    t_logp = F.log_softmax(teacher.float() / t, -1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        mask = mask.to(kl.dtype)
        return (kl * mask).sum() / mask.sum().clamp_min(1) * t * t
    return kl.mean() * t * t


class KDStrategy(ContinualStrategy):
    """Distillation to the previous task's model (see the module docstring)."""

    name = "kd"
    runners = ("pretrain", "finetune")
    changes_effective_lr = False
    config_class = KDConfig

    def __init__(self, config: KDConfig | None = None, **settings):
        super().__init__(config, **settings)
        self.task_id = -1
        self.teacher: nn.Module | None = None
        self._pending_teacher_state: dict[str, torch.Tensor] | None = None
        self.last_kd_loss: float | None = None

    def _snapshot(self, model: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(model)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.task_id = task_id
        if self._pending_teacher_state is not None:  # resumed: rebuild the teacher from the saved weights
            self.teacher = self._snapshot(model)
            self._load_teacher(self._pending_teacher_state)
            self._pending_teacher_state = None

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.teacher = None  # free the old copy before making the new one
        self.teacher = self._snapshot(model)

    def extra_loss(self, model: nn.Module, inputs: dict, outputs) -> torch.Tensor | None:
        if self.teacher is None or self.cfg.kd_weight == 0:
            return None
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        if "task_ids" in feed and hasattr(model, "heads"):
            loss = self._previous_heads_kl(model, feed)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(**feed).logits
            student_logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[1]
            loss = distillation_kl(student_logits, teacher_logits, self.cfg.kd_temperature, feed.get("attention_mask"))
        if loss is None:
            return None
        self.last_kd_loss = float(loss.detach())
        return self.cfg.kd_weight * loss

    def _previous_heads_kl(self, model: nn.Module, feed: dict) -> torch.Tensor | None:
        current = int(feed["task_ids"].flatten()[0])
        terms = []
        for j in range(current):
            ids = torch.full_like(feed["task_ids"], j)
            with torch.no_grad():
                t_logits = self.teacher(**{**feed, "task_ids": ids}).logits
            s_logits = model(**{**feed, "task_ids": ids}).logits
            terms.append(distillation_kl(s_logits, t_logits, self.cfg.kd_temperature))
        return torch.stack(terms).mean() if terms else None

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        # tied weights appear once per name in state_dict(); safetensors refuses shared storage, so copy
        return {f"teacher.{k}": v.detach().clone() for k, v in self.teacher.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        teacher = {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}
        if teacher and self.teacher is not None:  # within a task (a Trainer checkpoint): the teacher exists
            self._load_teacher(teacher)
            return
        self._pending_teacher_state = teacher or None  # built from the model in before_task

    def _load_teacher(self, weights: dict[str, torch.Tensor]) -> None:
        _, unexpected = self.teacher.load_state_dict(weights, strict=False)
        if unexpected:
            raise ValueError(f"saved KD teacher does not fit this model: unexpected keys {unexpected[:5]}")

    def config(self) -> dict:
        return {**super().config(), "task_id": self.task_id, "has_teacher": self.teacher is not None}
