"""A run's fingerprint: the settings that decide what it computes, which a resumed run must match (state.json).

Built from an allowlist, not a denylist: the ``TrainingArguments`` fields named in :data:`TRAINER_FIELDS`, and
every field a runner declares itself except the few in its ``not_in_fingerprint`` list. A field that a new
transformers release adds to ``TrainingArguments`` therefore changes no run's fingerprint; a runner field added here
is fingerprinted unless it is listed (and an old run without its key is read with the value in the runner's
``ADDED_SETTINGS``, :class:`~.checkpointing.RunState`).
"""

from __future__ import annotations

from dataclasses import fields

from transformers import TrainingArguments

from .renames import fingerprint_key

__all__ = ["TRAINER_FIELDS", "fingerprint", "runner_fields"]

#: TrainingArguments fields that change the numbers a run computes (the optimizer's trajectory or the data it sees).
#: Left out, because a run may be resumed with them changed and compute the same thing: output, logging, saving,
#: Hub and tracker settings; evaluation settings (the runners refuse Trainer evaluation and evaluate themselves);
#: how the work is spread (fsdp, ddp_*, parallelism_config, accelerator_config, dataloader workers and pinning);
#: recomputation and compilation that keep the maths (gradient/activation checkpointing, torch_compile*); use_cache,
#: *_full_eval (Trainer evaluation only) and label_names (which inputs Trainer evaluation treats as labels).
TRAINER_FIELDS = (
    # the optimisation: step size and its schedule, the optimizer and its constants, clipping, the loss
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "optim",
    "optim_args",
    "optim_target_modules",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "label_smoothing_factor",
    "neftune_noise_alpha",  # noise added to the embeddings during training
    "average_tokens_across_devices",  # the loss's normaliser, hence the gradient's scale
    # how long and on how much data per step (auto_find_batch_size may change the batch size)
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "auto_find_batch_size",
    # randomness and the order and content of the batches (ignore_data_skip: a resumed domain restarts its data)
    "seed",
    "data_seed",
    "full_determinism",
    "dataloader_drop_last",
    "dataloader_in_order",
    "train_sampling_strategy",
    "length_column_name",
    "remove_unused_columns",
    "ignore_data_skip",
    # the arithmetic: precision of training, TF32 matmuls, Liger's fused kernels
    "bf16",
    "fp16",
    "tf32",
    "use_liger_kernel",
    "liger_kernel_config",
)


def runner_fields(args, not_in_fingerprint) -> list[str]:
    """The init fields ``args``' class declares beyond ``TrainingArguments`` (all of them for a plain dataclass),
    less ``not_in_fingerprint``."""
    trainer = {f.name for f in fields(TrainingArguments)} if isinstance(args, TrainingArguments) else set()
    return [f.name for f in fields(args) if f.init and f.name not in trainer and f.name not in not_in_fingerprint]


def fingerprint(args, not_in_fingerprint=()) -> dict:
    """``{key: value}`` of :data:`TRAINER_FIELDS` (for ``TrainingArguments``) and ``args``' own fields less
    ``not_in_fingerprint``; values as ``to_dict`` gives them (what state.json holds), keys as runs saved them."""
    if isinstance(args, TrainingArguments):
        values = args.to_dict()
        names = [n for n in TRAINER_FIELDS if n in values] + runner_fields(args, not_in_fingerprint)
    else:
        values = {f.name: getattr(args, f.name) for f in fields(args)}
        names = runner_fields(args, not_in_fingerprint)
    return {fingerprint_key(n): values[n] for n in names if n in values}
