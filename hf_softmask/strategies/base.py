"""The strategy interface and the Trainer that drives it.

A strategy is a small object with a few hooks (before a task, an extra loss term, after
backward, after the optimizer step, after a task, state to save). It is not a branch inside the
trainer: :class:`StrategyTrainer` calls the hooks, whatever the strategy.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..core.callback import MaskDetailToIntegrations, merge_log_metrics
from ..core.clipping import MaskedClipMixin
from ..core.compatibility import check_strategy_supported, live_accelerator_state
from ..core.loss_scaling import fix_loss_kwargs
from ..core.trainer import resume_checkpoint
from ..utils.io import atomic_save_safetensors, atomic_write_json
from .units import build_config, config_dict, config_signature

__all__ = [
    "ContinualStrategy",
    "StrategyCallback",
    "StrategyTrainer",
    "STRATEGY_STATE_WEIGHTS",
    "STRATEGY_STATE_CONFIG",
]

STRATEGY_STATE_WEIGHTS = "strategy_state.safetensors"
STRATEGY_STATE_CONFIG = "strategy_config.json"

#: the runners a strategy may declare in ``runners``
RUNNERS = ("pretrain", "finetune")


class _SettingsAlias:
    """``settings``: the old name of ``runners`` (read with a FutureWarning; removed in the next release)."""

    def __get__(self, obj, owner):
        warnings.warn(
            f"{owner.__name__}.settings is deprecated and will be removed in the next release: read .runners",
            FutureWarning,
            stacklevel=2,
        )
        return owner.runners


class ContinualStrategy:
    """Base class: every hook is a no-op, so a subclass overrides only what it changes.

    Lifecycle over a sequence of tasks (domains, for continual pre-training)::

        model = strategy.prepare_model(model)            # once (wrap layers, add embeddings)
        for t, task in enumerate(tasks):
            strategy.before_task(model, t, train_dataloader)
            Trainer loop:  on_train_begin(model, optimizer)
                           loss += extra_loss(model, inputs, outputs)
                           after_backward(model)          # before the optimizer step
                           after_optimizer_step(model, optimizer)
                           on_train_end(model, optimizer)
            strategy.after_task(model, t, dataloader)     # importance, masks, snapshots

    ``state_dict()`` returns tensors (saved as safetensors) and ``config()`` JSON-able settings;
    ``save_pretrained``/``load_pretrained`` write/read both beside a model checkpoint.

    The runners read a few more members, declared here with neutral defaults: ``runners``, ``set_task``,
    ``importance``, ``domain_importances``, ``uses_general_importance`` / ``compute_general_importance``,
    ``contrastive_losses``, ``storage_bytes``, ``save_model``.

    Settings: a subclass names its ``<Name>Config`` dataclass in ``config_class``; the base class then builds
    ``self.cfg`` from ``config=`` or the fields as keywords (never both; an unknown keyword is refused with the
    valid ones) and gives ``__init__`` the signature ``(self, config=None, *, <field>=<default>, ...)``. A subclass
    that needs runtime state writes ``def __init__(self, config=None, **settings)`` and calls
    ``super().__init__(config, **settings)`` first. A subclass without ``config_class`` keeps its own ``__init__``.
    """

    name: str = "base"
    #: the runners that may use the strategy: "pretrain" (domain sequences, LM loss), "finetune" (task sequences)
    runners: tuple[str, ...] = RUNNERS
    settings = _SettingsAlias()  # deprecated name of ``runners``
    #: True when :meth:`compute_general_importance` does something: the pre-training runner then calls it before
    #: the first domain (set automatically for a subclass that defines the method and leaves this unset)
    uses_general_importance: bool = False
    #: the accumulated unit importance protecting the next task (a :class:`~hf_softmask.UnitImportance`), saved
    #: and plotted with every pre-training stage; None: the strategy keeps none
    importance = None
    #: each finished task's own importance, in task order (the pre-training runner plots the last one)
    domain_importances: Sequence = ()
    #: the contrastive loss of each optimizer step of the current task (its mean goes into state.json)
    contrastive_losses: Sequence[float] = ()
    #: task index -> bytes the strategy stores for that task (the finetune runner's ``storage_bytes_per_task``)
    storage_bytes: Mapping[int, int] = MappingProxyType({})
    #: True when the strategy lowers the effective learning rate of protected units, so it must be
    #: compared against the plain-training learning-rate frontier, not one plain run.
    changes_effective_lr: bool = False
    #: the ``<Name>Config`` dataclass of the strategy's settings (None: the subclass's own ``__init__`` decides)
    config_class: type | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "settings" in cls.__dict__:
            if "runners" in cls.__dict__:
                raise TypeError(f"{cls.__name__} declares both runners and settings (its old name): keep runners")
            warnings.warn(
                f"{cls.__name__}.settings is deprecated and will be removed in the next release: rename it runners",
                FutureWarning,
                stacklevel=2,
            )
            cls.runners = tuple(cls.__dict__["settings"])
            del cls.settings  # reads of cls.settings reach the alias, which warns
        if "compute_general_importance" in cls.__dict__ and "uses_general_importance" not in cls.__dict__:
            cls.uses_general_importance = True
        if cls.config_class is None:
            return
        if "__init__" not in cls.__dict__:
            # An inherited __init__ may be shared with another config_class: give this class its own to sign.
            def __init__(self, config=None, **settings):
                super(cls, self).__init__(config, **settings)

            __init__.__qualname__ = f"{cls.__qualname__}.__init__"
            cls.__init__ = __init__
        params = inspect.signature(cls.__init__).parameters
        if "config" not in params or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise TypeError(
                f"{cls.__name__} has config_class {cls.config_class.__name__}: its __init__ must be "
                "(self, config=None, **settings) and call super().__init__(config, **settings)"
            )
        cls.__init__.__signature__ = config_signature(cls.config_class)

    def __init__(self, config=None, **settings):
        if self.config_class is None:
            if config is not None or settings:
                raise TypeError(
                    f"{type(self).__name__} takes no settings (it has no config_class), got "
                    f"{['config'] if config is not None else sorted(settings)}"
                )
            self.cfg = None
            return
        self.cfg = build_config(self.config_class, config, settings)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.task_id = task_id

    def forward_kwargs(self, model: nn.Module, inputs: dict) -> dict:
        """Extra keyword arguments for the model's forward (e.g. a task id)."""
        return {}

    def extra_loss(self, model: nn.Module, inputs: dict, outputs) -> torch.Tensor | None:
        return None

    def on_train_schedule(self, batches_per_epoch: int) -> None:
        """Told before ``on_train_begin``: forward passes (micro-batches) the Trainer runs per epoch of this task."""
        pass

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        pass

    def after_backward(self, model: nn.Module) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module, optimizer) -> None:
        pass

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        pass

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        pass

    # -- what the runners read besides the Trainer hooks ------------------------------------------
    def set_task(self, task_id: int | None) -> None:
        """Evaluate as task ``task_id`` (``None``: the task being trained); the runners call it before each task's
        evaluation. Default: nothing (a strategy without per-task inference, i.e. all but HAT)."""

    def compute_general_importance(self, model: nn.Module, dataloader):
        """Before the first domain (pre-training runner, only when ``uses_general_importance``): estimate the
        general-knowledge importance on ``dataloader``. Default: nothing, returns None."""
        return None

    def save_model(self, model: nn.Module, directory: str | os.PathLike) -> None:
        """Write the trained model and this strategy's state into ``directory`` (the finetune runner's ``final/``;
        the classifier heads are saved beside it). Default: ``model.backbone`` (or ``model``, without one) with
        ``save_pretrained``, then :meth:`save_pretrained`."""
        getattr(model, "backbone", model).save_pretrained(directory)
        self.save_pretrained(directory)

    def log_metrics(self) -> dict[str, float]:
        """Scalars added to the Trainer's training logs (``report_to``) at logging steps.

        Default: the mask statistics of the strategy's active :class:`~hf_softmask.SoftMasker` (``self._masker``,
        as DAS and HAT keep it), else nothing.
        """
        masker = getattr(self, "_masker", None)
        return masker.statistics() if masker is not None else {}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def state_metadata(self) -> dict[str, str]:
        """Strings saved in the header of ``strategy_state.safetensors``, beside ``state_dict()``'s tensors: what
        describes them (e.g. an importance's provenance), so that it travels with them into every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def load_state_metadata(self, metadata: dict[str, str]) -> None:
        """Restore what :meth:`state_metadata` saved (called after :meth:`load_state_dict`)."""

    def config(self) -> dict:
        """``name`` and the settings (``self.cfg``'s fields); a subclass adds the scalars of its progress."""
        return {"name": self.name, **(config_dict(self.cfg) if getattr(self, "cfg", None) is not None else {})}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        state = self.state_dict()
        if state:
            atomic_save_safetensors(state, directory / STRATEGY_STATE_WEIGHTS, metadata=self.state_metadata() or None)
        atomic_write_json(directory / STRATEGY_STATE_CONFIG, self.config())

    def load_pretrained(self, directory: str | os.PathLike) -> None:
        from safetensors import safe_open

        path = Path(directory) / STRATEGY_STATE_WEIGHTS
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
            self.load_state_dict(state)
            self.load_state_metadata(metadata)

    def load_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Restore the state a :class:`StrategyTrainer` saved in ``checkpoint`` (a Trainer checkpoint of the task
        being trained): the state that moves every step (CBP's utilities, HAT's embeddings and annealing) continues
        where the checkpoint left it. Called after ``before_task``, before training resumes."""
        saved = self.saved_config(checkpoint)
        if saved is None:
            raise FileNotFoundError(
                f"{Path(checkpoint) / STRATEGY_STATE_CONFIG} is missing: {checkpoint} was not written by a "
                f"StrategyTrainer, so the {self.name} state of the steps it holds cannot be restored; resume from "
                "a checkpoint of this run, or start the task from its beginning"
            )
        if saved.get("name") != self.name:
            raise ValueError(
                f"{Path(checkpoint) / STRATEGY_STATE_CONFIG} holds the state of strategy {saved.get('name')!r}, "
                f"not {self.name!r}: resume with the strategy that wrote it"
            )
        self.load_pretrained(checkpoint)

    @staticmethod
    def saved_config(directory: str | os.PathLike) -> dict | None:
        path = Path(directory) / STRATEGY_STATE_CONFIG
        return json.loads(path.read_text()) if path.is_file() else None


class StrategyCallback(TrainerCallback):
    """Forwards Trainer events to a strategy's hooks."""

    def __init__(self, strategy: ContinualStrategy):
        self.strategy = strategy
        self._optimizer = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        # refused cells of docs/compatibility.md, with the precision and FSDP version the accelerator uses
        check_strategy_supported(self.strategy, args, model, live_accelerator_state())
        self._optimizer = optimizer
        per_epoch = (
            len(train_dataloader) if train_dataloader is not None and hasattr(train_dataloader, "__len__") else None
        )
        if state.max_steps and state.max_steps > 0:
            # training may stop before the first epoch ends (max_steps)
            planned = state.max_steps * args.gradient_accumulation_steps
            per_epoch = min(per_epoch, planned) if per_epoch else planned
        if per_epoch:
            self.strategy.on_train_schedule(int(per_epoch))
        self.strategy.on_train_begin(model, optimizer)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.strategy.after_backward(model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.strategy.after_optimizer_step(model, optimizer or self._optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self.strategy.log_metrics() if logs is not None else {}
        if metrics and not any(k in logs for k in metrics):  # StrategyTrainer.log added them already
            merge_log_metrics(logs, state, metrics)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.strategy.on_train_end(model, optimizer or self._optimizer)


class StrategyTrainer(MaskedClipMixin, Trainer):
    """A Trainer whose loss and steps are extended by a :class:`ContinualStrategy`; with update masks on its
    optimizer, ``max_grad_norm`` clips the masked gradients (:class:`~hf_softmask.core.clipping.MaskedClipMixin`)."""

    def __init__(self, *args, strategy: ContinualStrategy | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        fix_loss_kwargs(self)  # a model averaging its own loss must not be scaled by accumulation or processes
        self.strategy = strategy or ContinualStrategy()
        self.add_callback(StrategyCallback(self.strategy))
        MaskDetailToIntegrations.install(self)  # per-layer mask statistics to report_to, a summary to the console

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extra_kwargs = self.strategy.forward_kwargs(model, inputs)
        if extra_kwargs:
            inputs = {**inputs, **extra_kwargs}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            extra = self.strategy.extra_loss(model, inputs, outputs)
            if extra is not None:
                # The Trainer divides the loss by the accumulation steps only when the model did not
                # normalise by num_items_in_batch; the extra term must follow the same scaling.
                scaled = self.loss_is_scaled_for_ga
                if scaled is None:
                    scaled = (
                        self.model_accepts_loss_kwargs and num_items_in_batch is not None
                    ) or self.compute_loss_func is not None
                if scaled:
                    extra = extra / self.current_gradient_accumulation_steps
                loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Before the Trainer hands the logs to its report_to integrations and log_history.
        if "loss" in logs:
            logs.update(self.strategy.log_metrics())
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; resuming from a checkpoint also restores the strategy's state saved in it."""
        checkpoint = resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint:
            self.strategy.load_checkpoint(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        self.strategy.save_pretrained(output_dir or self.args.output_dir)
