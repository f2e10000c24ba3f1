"""SoftMaskCallback: soft-masking for a plain ``transformers.Trainer``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .clipping import clips_masked
from .compatibility import check_supported, live_accelerator_state
from .importance import UnitImportance
from .masking import SoftMaskConfig, SoftMasker, is_per_layer_key
from .softmask_resume import check_resume_settings, save_settings

__all__ = ["SoftMaskCallback", "MaskDetailToIntegrations", "merge_log_metrics"]


def merge_log_metrics(logs: dict, state, metrics: dict[str, float]) -> None:
    """Add ``metrics`` to a training log (one with ``loss``) in ``on_log``: to ``logs`` (seen by the callbacks after
    this one) and to the record the Trainer has just appended to ``state.log_history``."""
    if not metrics or "loss" not in logs:
        return
    logs.update(metrics)
    last = state.log_history[-1] if state.log_history else None
    if last is not None and last.get("step") == state.global_step and "loss" in last:
        last.update(metrics)


class MaskDetailToIntegrations(TrainerCallback):
    """Keeps the per-layer mask statistics for the ``report_to`` integrations: it removes them from the logs (and
    from the record just appended to ``log_history``) before the console's progress or printer callback, so a
    console line carries the bounded summary (mean mask of heads and of FFN neurons, fractions of important
    units) however many layers the model has. :meth:`install` puts it in its place."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        detail = [k for k in logs if is_per_layer_key(k)]
        last = state.log_history[-1] if state.log_history else {}
        for k in detail:
            logs.pop(k, None)
            last.pop(k, None)

    @classmethod
    def install(cls, trainer) -> None:
        """Insert one into ``trainer``'s callbacks right before its progress/printer callback (after the
        integrations and the user callbacks), once."""
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        callbacks = trainer.callback_handler.callbacks
        if any(isinstance(c, cls) for c in callbacks):
            return
        at = next((i for i, c in enumerate(callbacks) if isinstance(c, (PrinterCallback, ProgressCallback))), None)
        callbacks.insert(len(callbacks) if at is None else at, cls())


class SoftMaskCallback(TrainerCallback):
    """Protects important heads and FFN neurons during ``Trainer.train()``.

    Args:
        importance: a :class:`UnitImportance` (values in [0, 1]) or a directory/Hub id holding one.
        mode: ``"update"`` (default) scales the optimizer's whole change of each owned slice by
            ``1 - I``; ``"grad"`` scales gradients (before clipping, once per optimizer step). In update mode a
            plain Trainer's ``max_grad_norm`` clips the unmasked gradients (a warning says so at train begin);
            :class:`~hf_softmask.SoftMaskTrainer` clips the masked ones, like grad mode.
        config: a full :class:`SoftMaskConfig`; keyword arguments override its fields.
        allow_settings_change: allow resuming a checkpoint with other settings than it was trained with (a
            warning lists them); without it such a resume is refused naming each setting.
        per_layer: also log the mean mask of every layer (``.../layer_<l>`` keys).

    Every Trainer checkpoint gets the settings as ``softmask_config.json``; a resume compares them with this
    callback's (:mod:`hf_softmask.core.softmask_resume`; ``compile_update``, which changes only the speed, may differ).

    At every logging step the mask statistics (:func:`~hf_softmask.core.masking.mask_statistics`: mean mask of heads
    and of FFN neurons, fraction of units with importance > 0.5) join the training log and
    ``trainer.state.log_history``. The Trainer calls its ``report_to`` integrations before user callbacks; to
    have them receive the statistics and their per-layer detail too, use :class:`~hf_softmask.SoftMaskTrainer`
    (or put this callback first with ``per_layer=True`` and call ``MaskDetailToIntegrations.install(trainer)``).

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[SoftMaskCallback(importance, mode="update")])
    """

    def __init__(
        self,
        importance: UnitImportance | str | os.PathLike,
        mode: str | None = None,
        config: SoftMaskConfig | None = None,
        allow_settings_change: bool = False,
        per_layer: bool = False,
        **policies,
    ):
        if not isinstance(importance, UnitImportance):
            importance = UnitImportance.from_pretrained(importance)
        self.importance = importance
        base = config or SoftMaskConfig()
        fields = {**base.__dict__, **policies}
        if mode is not None:
            fields["mode"] = mode
        self.config = SoftMaskConfig(**fields)
        self.allow_settings_change = allow_settings_change
        self.masker: SoftMasker | None = None
        self._resume_checked = False
        self.per_layer = per_layer  # the per-layer keys too (for integrations that run before the console)

    def check_resume(self, checkpoint: str | os.PathLike) -> None:
        """Refuse resuming ``checkpoint`` with other settings than it was trained with (unless
        ``allow_settings_change``). :class:`~hf_softmask.SoftMaskTrainer` calls it before loading the checkpoint;
        under a plain Trainer, ``on_train_begin`` checks ``output_dir/checkpoint-<step>``."""
        check_resume_settings(checkpoint, self.config, self.allow_settings_change)
        self._resume_checked = True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # refused cells of docs/compatibility.md, with the precision and FSDP version the accelerator uses
        check_supported("SoftMaskCallback", args, model, live_accelerator_state())
        # resumed: the state came from a checkpoint (args and state are None when a custom loop drives the callback)
        if state is not None and state.global_step > 0 and not self._resume_checked:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                self.check_resume(checkpoint)
            else:
                warnings.warn(
                    f"resumed at step {state.global_step} from a checkpoint outside {args.output_dir}: its "
                    "soft-mask settings are not checked (SoftMaskTrainer checks them wherever it is)",
                    UserWarning,
                    stacklevel=2,
                )
        self._resume_checked = False  # the next train() call checks its own checkpoint
        if self.masker is not None:
            self.masker.detach()
        self.masker = SoftMasker(model, self.importance, self.config).attach(optimizer)
        clip = getattr(args, "max_grad_norm", 0) or 0
        if self.config.mode == "update" and clip > 0 and not clips_masked(optimizer):
            warnings.warn(
                "SoftMaskCallback in update mode on a Trainer without MaskedClipMixin: "
                f"max_grad_norm={args.max_grad_norm} clips by the norm of the unmasked gradients, "
                "so protected units' gradients shorten the free units' steps. Use SoftMaskTrainer (or "
                "class MyTrainer(hf_softmask.core.clipping.MaskedClipMixin, Trainer)) to clip the masked gradients, "
                "or max_grad_norm=0",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"  # where the Trainer saved
        if state.is_world_process_zero and checkpoint.is_dir():
            save_settings(self.config, checkpoint)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.masker is not None and logs is not None:
            stats = self.masker.statistics()
            if not self.per_layer:
                stats = {k: v for k, v in stats.items() if not is_per_layer_key(k)}
            merge_log_metrics(logs, state, stats)

    def on_train_end(self, args, state, control, **kwargs):
        if self.masker is not None:
            self.masker.detach()
            self.masker = None

    def set_importance(self, importance: UnitImportance) -> None:
        """Swap the importance (e.g. after the next domain); takes effect at once if training."""
        self.importance = importance
        if self.masker is not None:
            self.masker.update(importance)
