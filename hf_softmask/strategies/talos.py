"""TaLoS: task-localized sparse fine-tuning, and the sparse task vector it produces.

Before each task the per-entry sensitivity ``sum_x (d log p(y_hat|x) / d theta)^2`` (``y_hat`` sampled from the
model's own prediction, one backward per example) is estimated, and only the LEAST sensitive fraction
``keep_fraction`` of the scoped entries stays trainable. The fraction is reached over ``rounds`` rounds
(``k**(r/R)`` after round ``r``), each re-scoring with fresh examples and a global threshold over all scoped entries
(``kthvalue``, exact at any size; ``torch.quantile`` stops at 2**24 elements). A scoped parameter the loss has no
gradient path to (e.g. BERT's pooler under a classifier that pools the hidden states itself) scores Fisher 0 without
being insensitive: it is excluded from the candidates (frozen, listed in ``excluded``), and the fraction ``k`` is
taken of the reachable entries. Training then runs with update masks fused into the optimizer, so frozen entries
neither move nor decay (AdamW) and carry no momentum (SGD). After the task the sparse task vector
``tau = theta_after - theta_before`` on the trainable entries is kept (and optionally written): a bit
mask (1 bit per scoped weight) plus the changed values. Update masks are bool tensors, never copies in the
parameter's dtype.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..baselines.fisher import fisher_diagonal
from ..baselines.task_vectors import SparseTaskVector
from ..core.bitpack import pack_bits, unpack_bits
from ..core.compatibility import check_strategy_supported
from ..core.optim import install_update_masks
from ..core.peft_support import unwrap_peft
from .base import ContinualStrategy
from .units import StrategyConfig, unit_model

__all__ = ["TaLoSConfig", "TaLoSStrategy", "lm_head_parameters", "lowest_fraction_masks", "scoped_parameters"]

SCOPES = ("linear", "all")


@dataclass
class TaLoSConfig(StrategyConfig):
    """Settings of :class:`TaLoSStrategy` (each may be passed as a keyword)."""

    keep_fraction: float = field(
        default=0.1, metadata={"help": "Fraction k of the scoped entries that stays trainable (the least sensitive)."}
    )
    rounds: int = field(
        default=4, metadata={"help": "Rounds R of re-scoring; after round r, k**(r/R) of the entries stay trainable."}
    )
    examples_per_round: int = field(default=32, metadata={"help": "Examples scored per round (one backward each)."})
    scope: str = field(
        default="linear",
        metadata={
            "help": "'linear': weight matrices of the base model (not embeddings); 'all': every parameter of the base "
            "model. Out-of-scope base parameters and the LM head (with an embedding tied to it) are frozen.",
            "choices": list(SCOPES),
        },
    )
    train_task_head: bool = field(
        default=True,
        metadata={
            "help": "Train parameters outside the base model (a classifier head) fully; an LM head stays frozen."
        },
    )
    task_vector_dir: str | None = field(
        default=None,
        metadata={"help": "If set, write task_<t>.safetensors (the sparse task vector) there after each task."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the label sampling."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must lie in (0, 1], got {self.keep_fraction}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.examples_per_round < 1:
            raise ValueError(f"examples_per_round must be >= 1, got {self.examples_per_round}")


def lm_head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LM head under every name it has in ``model`` (``lm_head``, BERT's ``cls.*`` with its MLM transform).

    The parameters held by modules outside the base model of a transformers model that has output embeddings
    (a tied head is listed under its own name, e.g. ``lm_head.weight``, though it is the embedding tensor). A
    classifier (no output embeddings) and the finetuning runner's task heads (outside the transformers model) are
    no LM head.
    """
    lm = unwrap_peft(unit_model(model))
    get_output_embeddings = getattr(lm, "get_output_embeddings", None)
    base = getattr(lm, "base_model", lm)
    if base is lm or not callable(get_output_embeddings) or get_output_embeddings() is None:
        return {}
    inside = {id(m) for m in base.modules()}
    head_modules = {id(m) for m in lm.modules() if id(m) not in inside}
    return {
        name: p
        for name, p in model.named_parameters(remove_duplicate=False)
        if id(model.get_submodule(name.rpartition(".")[0])) in head_modules
    }


def scoped_parameters(model: nn.Module, scope: str = "linear") -> dict[str, nn.Parameter]:
    """Parameters TaLoS scores: base-model weight matrices (``"linear"``) or all base-model parameters (``"all"``),
    never the LM head: a scoped tensor the LM head shares (tied embeddings under ``"all"``) is left out, and a
    warning names it and its head name."""
    base = unit_model(model)
    base = getattr(base, "base_model", base)
    base_ids = {id(p) for p in base.parameters()}
    embedding_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Embedding) or "Embedding" in type(m).__name__
        for p in m.parameters(recurse=False)
    }
    head_names: dict[int, str] = {}
    for name, p in lm_head_parameters(model).items():
        head_names.setdefault(id(p), name)
    out, left_out = {}, []
    for name, p in model.named_parameters():
        if id(p) not in base_ids or not p.requires_grad:
            continue
        if scope == "linear" and (p.dim() != 2 or id(p) in embedding_ids):
            continue
        if id(p) in head_names:  # the LM head stays frozen, and a tensor tied to it with it
            left_out.append(name if head_names[id(p)] == name else f"{name} (the LM head's {head_names[id(p)]})")
            continue
        out[name] = p
    if left_out:
        warnings.warn(
            f"TaLoS keeps the LM head frozen: {', '.join(left_out)} left out of scope {scope!r}",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


def lowest_fraction_masks(scores: dict[str, torch.Tensor], n_keep: int) -> dict[str, torch.Tensor]:
    """Bool masks selecting exactly ``n_keep`` entries with the lowest scores over all tensors together.

    Ties at the threshold are broken by position, so the count is exact. Uses ``kthvalue`` on the
    concatenated scores (no 2**24 limit).
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().flatten().cpu() for n in names])
    total = flat.numel()
    if not 0 <= n_keep <= total:
        raise ValueError(f"n_keep must lie in 0..{total}, got {n_keep}")
    if n_keep == total:
        keep = torch.ones(total, dtype=torch.bool)
    elif n_keep == 0:
        keep = torch.zeros(total, dtype=torch.bool)
    else:
        thr = torch.kthvalue(flat, n_keep).values
        keep = flat < thr
        missing = n_keep - int(keep.sum())
        if missing > 0:
            keep[(flat == thr).nonzero().flatten()[:missing]] = True
    out, offset = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = keep[offset : offset + k].view(scores[n].shape)
        offset += k
    return out


class TaLoSStrategy(ContinualStrategy):
    """Sparse fine-tuning of the least sensitive entries, one task vector per task (see the module docstring)."""

    name = "talos"
    runners = ("pretrain", "finetune")
    changes_effective_lr = False
    config_class = TaLoSConfig

    def __init__(self, config: TaLoSConfig | None = None, **settings):
        super().__init__(config, **settings)
        self.task_id = -1
        self.trainable: dict[str, torch.Tensor] = {}  # name -> bool mask (CPU) of the current task
        self.base_values: dict[str, torch.Tensor] = {}  # name -> values of the trainable entries before the task
        self.task_vectors: dict[int, SparseTaskVector] = {}
        self.round_log: list[dict] = []
        self.excluded: list[str] = []  # scoped parameters with no gradient path to the loss (frozen)
        self._handle = None
        self._model: nn.Module | None = None

    # -- selection --------------------------------------------------------------------------------
    def select(self, model: nn.Module, dataloader) -> dict[str, torch.Tensor]:
        """Compute the trainable masks over ``rounds`` rounds of Fisher scoring on ``dataloader``."""
        if dataloader is None:
            raise ValueError(
                "TaLoS scores sensitivity on the task's data: "
                "pass the train dataloader to before_task(model, task_id, dataloader)"
            )
        params = scoped_parameters(model, self.cfg.scope)
        if not params:
            raise ValueError(f"no parameter of {type(model).__name__} is in TaLoS scope {self.cfg.scope!r}")
        trainable = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in params.items()}
        batches = (
            itertools.cycle(dataloader) if hasattr(dataloader, "__len__") and len(dataloader) > 0 else iter(dataloader)
        )
        self.round_log = []
        self.excluded = []
        for r in range(1, self.cfg.rounds + 1):
            target = self.cfg.keep_fraction ** (r / self.cfg.rounds)
            reached: set[str] = set()
            scores, seen = fisher_diagonal(
                model,
                batches,
                params,
                max_examples=self.cfg.examples_per_round,
                seed=self.cfg.seed + 1000 * max(self.task_id, 0) + r,
                desc=f"TaLoS round {r}/{self.cfg.rounds}",
                reached=reached,
            )
            if r == 1:
                self.excluded = sorted(set(params) - reached)
                if len(self.excluded) == len(params):
                    raise ValueError("no TaLoS-scoped parameter has a gradient path to the model's log-likelihood")
                if self.excluded:
                    warnings.warn(
                        f"TaLoS: {len(self.excluded)} scoped parameter(s) never affect the loss and stay "
                        f"frozen (not ranked as least sensitive): {self.excluded[:4]}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                params = {n: p for n, p in params.items() if n in reached}
                scores = {n: s for n, s in scores.items() if n in reached}
                trainable = {n: trainable[n] for n in params}
                total = sum(p.numel() for p in params.values())
            # entries frozen in an earlier round stay frozen
            scores = {n: s.cpu().masked_fill(~trainable[n], float("inf")) for n, s in scores.items()}
            n_keep = int(round(target * total))
            trainable = lowest_fraction_masks(scores, n_keep)
            self.round_log.append({"round": r, "keep_fraction": target, "trainable": n_keep, "examples": seen})
        return trainable

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        # Before the selection, which would fail on FSDP1's flat parameters with a misleading scope error.
        check_strategy_supported(self, model=model)
        self.task_id = task_id
        self._model = model
        self.trainable = self.select(model, dataloader)
        params = dict(model.named_parameters())
        self.base_values = {n: params[n].detach()[m.to(params[n].device)].cpu() for n, m in self.trainable.items()}

    def update_masks(self, model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
        """Update masks for the optimizer: trainable entries 1, frozen 0; out-of-scope base parameters and the LM head
        frozen; other parameters outside the base model (task heads) trained as ``train_task_head`` says."""
        if not self.trainable:
            raise RuntimeError(
                "TaLoS has no trainable set: call before_task(model, task_id, dataloader) before training"
            )
        base = unit_model(model)
        base_ids = {id(p) for p in getattr(base, "base_model", base).parameters()}
        head_ids = {id(p) for p in lm_head_parameters(model).values()}
        masks = {}
        for name, p in model.named_parameters():
            if name in self.trainable:
                masks[p] = self.trainable[name].to(device=p.device)  # bool: 1 byte per entry, no dtype-sized copy
            elif id(p) in base_ids or id(p) in head_ids or not self.cfg.train_task_head:
                masks[p] = torch.zeros((), device=p.device, dtype=p.dtype)
        return masks

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = install_update_masks(optimizer, self.update_masks(model))

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def task_vector(self, model: nn.Module) -> SparseTaskVector:
        """The current task's ``theta - theta_before`` on its trainable entries."""
        params = dict(model.named_parameters())
        tv = SparseTaskVector()
        for name, m in self.trainable.items():
            now = params[name].detach()[m.to(params[name].device)].float().cpu()
            tv.add(name, m, now - self.base_values[name].float())
        return tv

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        tv = self.task_vector(model)
        self.task_vectors[task_id] = tv
        if self.cfg.task_vector_dir:
            tv.save_pretrained(self.cfg.task_vector_dir, filename=f"task_{task_id}.safetensors")

    def trainable_fraction(self) -> float:
        total = sum(m.numel() for m in self.trainable.values())
        return sum(int(m.sum()) for m in self.trainable.values()) / max(total, 1)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, m in self.trainable.items():
            state[f"trainable.{name}"] = pack_bits(m)
            state[f"base.{name}"] = self.base_values[name]
        for t, tv in self.task_vectors.items():
            for name in tv.masks:
                state[f"tv.{t}.{name}.mask"] = tv.masks[name]
                state[f"tv.{t}.{name}.values"] = tv.values[name]
        return state

    def config(self) -> dict:
        shapes = {n: list(m.shape) for n, m in self.trainable.items()}
        tv_shapes = {str(t): {n: list(s) for n, s in tv.shapes.items()} for t, tv in self.task_vectors.items()}
        return {
            **super().config(),
            "task_id": self.task_id,
            "shapes": shapes,
            "task_vector_shapes": tv_shapes,
            "rounds_log": self.round_log,
            "excluded": self.excluded,
        }

    def load_pretrained(self, directory) -> None:
        from safetensors.torch import load_file

        from .base import STRATEGY_STATE_WEIGHTS

        saved = self.saved_config(directory) or {}
        self.task_id = int(saved.get("task_id", self.task_id))
        self.round_log = saved.get("rounds_log", [])
        self.excluded = saved.get("excluded", [])
        path = Path(directory) / STRATEGY_STATE_WEIGHTS
        state = load_file(str(path)) if path.is_file() else {}
        self.trainable = {
            n: unpack_bits(state[f"trainable.{n}"], shape) for n, shape in saved.get("shapes", {}).items()
        }
        self.base_values = {n: state[f"base.{n}"] for n in self.trainable}
        self.task_vectors = {}
        for t, shapes in saved.get("task_vector_shapes", {}).items():
            tv = SparseTaskVector(shapes={n: tuple(s) for n, s in shapes.items()})
            for n in shapes:
                tv.masks[n] = state[f"tv.{t}.{n}.mask"]
                tv.values[n] = state[f"tv.{t}.{n}.values"]
            self.task_vectors[int(t)] = tv
