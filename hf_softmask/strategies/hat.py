"""HAT (hard attention to the task) and AdaHAT on attention heads and FFN neurons.

Each task ``t`` owns one embedding per unit (``e_heads[L, H]``, ``e_ffn[L, I]``). During training
the units are gated by ``a = sigmoid(s * e)`` (installed with :class:`~hf_softmask.core.gates.UnitGates`),
with ``s`` annealed over each epoch's batches from ``1/s_max`` to ``s_max``; the embedding gradient's
compensation for the sharp sigmoid is applied inside each forward's graph with that forward's ``s`` (so gradient
accumulation sums compensated micro-batch gradients). After the task the
binary mask ``1[e > 0]`` is stored; the cumulative mask (elementwise max over finished tasks)
protects the parameter slices owned by used units from later tasks. At inference, task ``t`` runs
with its own binary mask (:meth:`HATStrategy.set_task`).

AdaHAT replaces the hard protection ``1 - a_prev`` by a soft rate ``r / (I + r)``,
``r = alpha / (eps + R_l)``, with ``I`` the number of earlier tasks that used the unit and ``R_l``
the current task's mask sparsity in layer ``l``; units no earlier task used train freely. The rate is refreshed
whenever a forward sets the gates, before its backward (grad mode masks during backward).

Parameters that no unit owns (embeddings, norms, LM head, output biases) follow
``unowned_policy`` from the second task on (default ``"freeze"``, which is what makes a task's
outputs under its own mask exactly reproducible later).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.gates import UnitGates
from ..core.importance import UnitImportance
from ..core.layout import UNOWNED_CATEGORIES, UnitLayout
from ..core.masking import MODES, POLICIES, SoftMaskConfig, SoftMasker
from .base import ContinualStrategy
from .units import StrategyConfig, unit_model

__all__ = ["HATConfig", "AdaHATConfig", "HATStrategy", "AdaHATStrategy", "hat_scale"]


@dataclass
class HATConfig(StrategyConfig):
    """Settings of :class:`HATStrategy` (each may be passed as a keyword to the strategy)."""

    s_max: float = field(
        default=400.0,
        metadata={"help": "Final gate sharpness: a = sigmoid(s*e), s annealed from 1/s_max to s_max over each epoch."},
    )
    c: float = field(
        default=0.75, metadata={"help": "Weight of the sparsity regularizer c * sum(a*(1-a_prev)) / sum(1-a_prev)."}
    )
    clamp: float = field(
        default=6.0, metadata={"help": "Task embeddings are clamped to [-clamp, clamp] after every step."}
    )
    cosh_clamp: float = field(
        default=50.0,
        metadata={"help": "Clamp of s*e inside cosh() in the embedding-gradient compensation (overflow guard)."},
    )
    embedding_lr: float = field(
        default=0.05,
        metadata={"help": "SGD learning rate of the task embeddings (they are not in the Trainer's optimizer)."},
    )
    embedding_init_std: float = field(
        default=1.0, metadata={"help": "New task embeddings are drawn from N(0, std^2) (the HAT paper's init)."}
    )
    mode: str = field(
        default="update",
        metadata={
            "help": "'update': scale the optimizer's whole change of owned slices "
            "(exact freeze under AdamW with weight "
            "decay). 'grad': scale gradients, as in the paper (only exact under SGD).",
            "choices": list(MODES),
        },
    )
    unowned_policy: str = field(
        default="freeze",
        metadata={
            "help": "Policy for parameters no unit owns (embeddings, norms, LM head, output biases), from the second "
            "task on.",
            "choices": list(POLICIES),
        },
    )
    batches_per_epoch: int | None = field(
        default=None,
        metadata={
            "help": "Batches per epoch for the annealing of s; by default the Trainer's "
            "micro-batches per epoch (capped by max_steps), else the length of the "
            "dataloader passed to before_task."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the task-embedding initialisation."})

    def __post_init__(self):
        super().__post_init__()
        if self.s_max < 1:
            raise ValueError(f"s_max must be >= 1, got {self.s_max}")
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {self.batches_per_epoch}")


@dataclass
class AdaHATConfig(HATConfig):
    """Settings of :class:`AdaHATStrategy`: HAT's plus the soft-rate constants."""

    alpha: float = field(default=0.1, metadata={"help": "Adjustment intensity: r = alpha / (eps + R_l)."})
    eps: float = field(default=0.1, metadata={"help": "Keeps r finite when the layer's mask sparsity R_l is 0."})


def _compensated(e: torch.Tensor, s: float, cfg: HATConfig) -> torch.Tensor:
    """``e`` in value; in backward its gradient is multiplied by HAT's compensation for this forward's ``s``.

    ``(s_max / s) (cosh(clamp(s e)) + 1) / (cosh(e) + 1)`` (HAT eq. 6): without it the embeddings of a sharp
    sigmoid get vanishing gradients. Applied per forward, so with gradient accumulation every micro-batch's
    gradient is compensated with its own ``s`` before the gradients are summed.
    """
    with torch.no_grad():
        sharp = torch.cosh(torch.clamp(s * e, -cfg.cosh_clamp, cfg.cosh_clamp)) + 1
        factor = cfg.s_max / s * sharp / (torch.cosh(e) + 1)
    return e.detach() + (e - e.detach()) * factor


def hat_scale(b: int, num_batches: int, s_max: float) -> float:
    """Gate sharpness for batch ``b`` (counted from 1) of ``num_batches``: 1/s_max ... s_max, linearly.

    With a single batch per epoch the annealing has no length; the batch trains at ``s_max``, the
    sharpness used at inference.
    """
    if b < 1 or b > num_batches:
        raise ValueError(f"batch index must lie in 1..{num_batches}, got {b}")
    if num_batches == 1:
        return float(s_max)
    return 1.0 / s_max + (s_max - 1.0 / s_max) * (b - 1) / (num_batches - 1)


class HATStrategy(ContinualStrategy):
    """Hard attention to the task on heads and FFN neurons (see the module docstring)."""

    name = "hat"
    runners = ("pretrain", "finetune")
    changes_effective_lr = False
    config_class = HATConfig

    def __init__(self, config: HATConfig | None = None, **settings):
        super().__init__(config, **settings)
        self.task_id = -1
        self.layout: UnitLayout | None = None
        self.gates: UnitGates | None = None
        self.e_heads: torch.Tensor | None = None
        self.e_ffn: torch.Tensor | None = None
        self.masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # task -> (heads, ffn) in {0, 1}
        self.cum_heads: torch.Tensor | None = None
        self.cum_ffn: torch.Tensor | None = None
        self.eval_task: int | None = None
        self._batch_in_epoch = 0
        self._num_batches: int | None = None
        self._training_gates = False
        self._masker: SoftMasker | None = None
        self._embedding_task = -1  # task whose embeddings e_heads/e_ffn hold
        self._resume_batch: int | None = None

    # -- setup ------------------------------------------------------------------------------------
    def _ensure(self, model: nn.Module) -> None:
        model = unit_model(model)
        if self.layout is not None and self.layout.model is model:
            return
        if self.gates is not None:
            self.gates.remove()
        self.layout = UnitLayout.from_model(model)
        self.gates = UnitGates(self.layout)
        L, H, I = self.layout.num_layers, self.layout.num_heads, self.layout.ffn_size
        if self.cum_heads is None:
            self.cum_heads, self.cum_ffn = torch.zeros(L, H), torch.zeros(L, I)
        elif tuple(self.cum_heads.shape) != (L, H) or tuple(self.cum_ffn.shape) != (L, I):
            raise ValueError(
                f"HAT state has masks heads{tuple(self.cum_heads.shape)}/ffn{tuple(self.cum_ffn.shape)} but the model "
                f"has heads{(L, H)}/ffn{(L, I)}; it was saved for another model"
            )
        self._show_task_mask(self.eval_task if self.eval_task is not None else self.task_id)

    def _device(self) -> torch.device:
        return next(self.layout.base_model.parameters()).device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self._ensure(model)
        return model

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self._ensure(model)
        self.task_id = task_id
        self.eval_task = None
        self._num_batches = None
        if self.cfg.batches_per_epoch is not None:
            self._num_batches = self.cfg.batches_per_epoch
        elif dataloader is not None and hasattr(dataloader, "__len__"):
            self._num_batches = len(dataloader)  # until the Trainer tells the exact schedule
        self._batch_in_epoch = 0
        if self.e_heads is None or self._embedding_task != task_id:
            g = torch.Generator().manual_seed(self.cfg.seed + task_id)
            L, H, I = self.layout.num_layers, self.layout.num_heads, self.layout.ffn_size
            std = self.cfg.embedding_init_std
            self.e_heads = (torch.randn(L, H, generator=g) * std).to(self._device()).requires_grad_(True)
            self.e_ffn = (torch.randn(L, I, generator=g) * std).to(self._device()).requires_grad_(True)
            self._embedding_task = task_id

    # -- masks ------------------------------------------------------------------------------------
    def binary_mask(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(heads, ffn) binary mask of ``task_id``: stored after the task, or 1[e > 0] while it trains."""
        if task_id in self.masks:
            return self.masks[task_id]
        if task_id == self.task_id and self.e_heads is not None:
            return (self.e_heads.detach() > 0).float().cpu(), (self.e_ffn.detach() > 0).float().cpu()
        return None

    def set_task(self, task_id: int | None) -> None:
        """Run inference with the binary mask of ``task_id`` (``None``: the task being trained).

        A task that has no mask yet (not trained) runs ungated, i.e. with the whole network.
        """
        self.eval_task = task_id
        if self.gates is not None:
            self._show_task_mask(task_id if task_id is not None else self.task_id)

    def _show_task_mask(self, task_id: int) -> None:
        mask = self.binary_mask(task_id) if task_id is not None and task_id >= 0 else None
        if mask is None:
            self.gates.head_gate = self.gates.ffn_gate = None
        else:
            dev = self._device()
            self.gates.head_gate, self.gates.ffn_gate = mask[0].to(dev), mask[1].to(dev)
        self._training_gates = False

    # -- training hooks ---------------------------------------------------------------------------
    def forward_kwargs(self, model: nn.Module, inputs: dict) -> dict:
        """Sets the gates for this forward: sigmoid(s*e) while training, the task's binary mask otherwise."""
        if model.training:
            if self.e_heads is None:
                raise RuntimeError(
                    "HAT has no task embedding yet: "
                    "call strategy.before_task(model, task_id, dataloader) before training"
                )
            if self._num_batches is None:
                raise ValueError(
                    "HAT anneals s over each epoch's batches and needs their number: pass the train dataloader to "
                    "before_task(model, task_id, dataloader) or set batches_per_epoch"
                )
            self._batch_in_epoch = self._batch_in_epoch % self._num_batches + 1
            s = hat_scale(self._batch_in_epoch, self._num_batches, self.cfg.s_max)
            self.gates.head_gate = torch.sigmoid(s * _compensated(self.e_heads, s, self.cfg))
            self.gates.ffn_gate = torch.sigmoid(s * _compensated(self.e_ffn, s, self.cfg))
            self._training_gates = True
            self._gates_changed()
        elif self._training_gates:
            self._show_task_mask(self.eval_task if self.eval_task is not None else self.task_id)
        return {}

    def extra_loss(self, model: nn.Module, inputs: dict, outputs) -> torch.Tensor | None:
        if not self._training_gates:
            return None
        a = torch.cat([self.gates.head_gate.flatten(), self.gates.ffn_gate.flatten()])
        free = 1 - torch.cat([self.cum_heads.flatten(), self.cum_ffn.flatten()]).to(a.device)
        total = free.sum()
        if total <= 0:  # every unit already used: nothing left to regularize
            return None
        return self.cfg.c * (a * free).sum() / total

    def _protection(self) -> UnitImportance:
        """Per-unit importance whose soft mask 1 - I is the gradient/update factor of the owned slices."""
        return UnitImportance(self.cum_heads.clone(), self.cum_ffn.clone(), {"layout": self.layout.signature()})

    def _mask_config(self) -> SoftMaskConfig:
        return SoftMaskConfig(mode=self.cfg.mode, **{cat: self.cfg.unowned_policy for cat in UNOWNED_CATEGORIES})

    def on_train_schedule(self, batches_per_epoch: int) -> None:
        if self.cfg.batches_per_epoch is None:
            self._num_batches = batches_per_epoch

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        self._ensure(model)
        self._batch_in_epoch = 0 if self._resume_batch is None else self._resume_batch
        self._resume_batch = None
        if self._masker is not None:
            self._masker.detach()
            self._masker = None
        if self.masks:  # from the second task on
            self._masker = SoftMasker(
                self.layout.model, self._protection(), self._mask_config(), layout=self.layout
            ).attach(optimizer)

    def _gates_changed(self) -> None:
        """Called after the training gates of a forward are set (before its backward)."""

    def after_optimizer_step(self, model: nn.Module, optimizer) -> None:
        with torch.no_grad():
            for e in (self.e_heads, self.e_ffn):
                if e is None or e.grad is None:
                    continue
                e.sub_(e.grad, alpha=self.cfg.embedding_lr)
                e.grad = None
                e.clamp_(-self.cfg.clamp, self.cfg.clamp)

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        if self._masker is not None:
            self._masker.detach()
            self._masker = None
        self._show_task_mask(self.eval_task if self.eval_task is not None else self.task_id)

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        if self.e_heads is None:
            raise RuntimeError("after_task called before before_task: HAT has no embedding for this task")
        mask = ((self.e_heads.detach() > 0).float().cpu(), (self.e_ffn.detach() > 0).float().cpu())
        self.masks[task_id] = mask
        self.cum_heads = torch.maximum(self.cum_heads, mask[0])
        self.cum_ffn = torch.maximum(self.cum_ffn, mask[1])
        self._show_task_mask(task_id)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for t, (h, f) in self.masks.items():
            state[f"mask.{t}.heads"] = h.to(torch.uint8)
            state[f"mask.{t}.ffn"] = f.to(torch.uint8)
        if self.e_heads is not None:
            state["embedding.heads"] = self.e_heads.detach().cpu()
            state["embedding.ffn"] = self.e_ffn.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = {}
        for key, value in state.items():
            if key.startswith("mask.") and key.endswith(".heads"):
                t = int(key.split(".")[1])
                self.masks[t] = (value.float(), state[f"mask.{t}.ffn"].float())
        if self.masks:
            hs = torch.stack([m[0] for m in self.masks.values()])
            fs = torch.stack([m[1] for m in self.masks.values()])
            self.cum_heads, self.cum_ffn = hs.amax(0), fs.amax(0)
        if "embedding.heads" in state:
            dev = self._device() if self.layout is not None else "cpu"
            self.e_heads = state["embedding.heads"].float().to(dev).requires_grad_(True)
            self.e_ffn = state["embedding.ffn"].float().to(dev).requires_grad_(True)

    def config(self) -> dict:
        return {
            **super().config(),
            "task_id": self.task_id,
            "embedding_task": self._embedding_task,
            "batch_in_epoch": self._batch_in_epoch,
            "num_batches": self._num_batches,
        }

    def load_pretrained(self, directory) -> None:
        super().load_pretrained(directory)
        saved = self.saved_config(directory) or {}
        self.task_id = int(saved.get("task_id", self.task_id))
        self._embedding_task = int(saved.get("embedding_task", self._embedding_task))
        self._batch_in_epoch = int(saved.get("batch_in_epoch", 0))
        self._resume_batch = self._batch_in_epoch
        self._num_batches = saved.get("num_batches", self._num_batches)
        if self.gates is not None:
            if self.e_heads is not None:
                self.e_heads = self.e_heads.to(self._device()).detach().requires_grad_(True)
                self.e_ffn = self.e_ffn.to(self._device()).detach().requires_grad_(True)
            self._show_task_mask(self.task_id)


class AdaHATStrategy(HATStrategy):
    """HAT with AdaHAT's soft update rate ``r / (I + r)`` on units used by earlier tasks."""

    name = "adahat"
    changes_effective_lr = True
    config_class = AdaHATConfig

    def __init__(self, config: AdaHATConfig | None = None, **settings):
        super().__init__(config, **settings)
        self.sum_heads: torch.Tensor | None = None
        self.sum_ffn: torch.Tensor | None = None

    def _ensure(self, model: nn.Module) -> None:
        super()._ensure(model)
        if self.sum_heads is None:
            self.sum_heads, self.sum_ffn = torch.zeros_like(self.cum_heads), torch.zeros_like(self.cum_ffn)

    def layer_sparsity(self) -> torch.Tensor:
        """R_l: the current task's mask sparsity regularizer, per layer, over heads and FFN neurons."""
        a = torch.cat([self.gates.head_gate, self.gates.ffn_gate], dim=1).detach().float().cpu()
        free = 1 - torch.cat([self.cum_heads, self.cum_ffn], dim=1)
        denom = free.sum(1)
        return torch.where(denom > 0, (a * free).sum(1) / denom.clamp_min(1e-12), torch.zeros_like(denom))

    def _protection(self) -> UnitImportance:
        if self._training_gates and self.gates.head_gate is not None and self.gates.head_gate.dim() == 2:
            R = self.layer_sparsity()
        else:
            R = torch.zeros(self.layout.num_layers)
        r = (self.cfg.alpha / (self.cfg.eps + R)).unsqueeze(1)
        rate_h = r / (self.sum_heads + r)
        rate_f = r / (self.sum_ffn + r)
        return UnitImportance(1 - rate_h, 1 - rate_f, {"layout": self.layout.signature()})

    def _gates_changed(self) -> None:
        # The rate depends on this forward's gates (R_l). Grad mode masks during backward, so the masks must be
        # refreshed now, before backward, not after it (update mode would also do with a refresh before the step).
        if self._masker is not None:
            self._masker.update(self._protection())

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        super().after_task(model, task_id, dataloader)
        h, f = self.masks[task_id]
        self.sum_heads = self.sum_heads + h
        self.sum_ffn = self.sum_ffn + f

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self.masks:
            self.sum_heads = torch.stack([m[0] for m in self.masks.values()]).sum(0)
            self.sum_ffn = torch.stack([m[1] for m in self.masks.values()]).sum(0)
