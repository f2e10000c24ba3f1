"""Settings of a continual finetuning run: ``TrainingArguments`` plus the runner's own fields.

Every Trainer flag keeps its meaning per task: ``max_steps`` / ``num_train_epochs`` count per task, the schedule
(warm-up included) restarts at every task, ``--optim`` builds each task's optimizer (heads at
``head_learning_rate``), ``per_device_eval_batch_size`` sizes the runner's evaluation and ``after_task`` passes.
Flags the runner cannot honour are refused (:mod:`..cli`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ...task_heads import POOLINGS
from ...utils.extras import require
from ..cli import (
    parse_with_yaml,
    refuse_fsdp1_flags,
    refuse_unsupported_trainer_flags,
    require_choice,
    require_positive,
    require_steps,
    use_cpu_without_cuda,
)
from ..fingerprint import fingerprint
from ..strategy_settings import parse_strategy_kwargs, strategy_kwargs_text

__all__ = ["ContinualFinetuningArguments", "parse_finetuning_config", "DEFAULT_TASKS", "PROG"]

PROG = "hf-softmask finetune"
DEFAULT_TASKS = ["business,entertainment", "politics,sports", "tech,entertainment"]

#: The runner's own fields that do not change what a run computes (the Trainer's: .fingerprint.TRAINER_FIELDS).
NOT_IN_FINGERPRINT = frozenset({"num_threads", "register_architecture", "plots", "overwrite_output_dir"})


@dataclass
class ContinualFinetuningArguments(TrainingArguments):
    """Everything a continual finetuning run needs; every field is also a ``--flag`` that overrides the YAML."""

    # -- Trainer fields whose defaults differ from TrainingArguments (CPU-sized, per task) ------------------------
    output_dir: str | None = field(
        default="outputs/continual_finetune", metadata={"help": "Where results.json, the heatmap and final/ go."}
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs per task."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(
        default=32, metadata={"help": "Batch size of the runner's evaluation and of after_task passes."}
    )
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the backbone's trainable parameters (TSS scores, or all weights for ft)."},
    )
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Scheduler within each task (restarts at every task)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps of a task."})
    save_strategy: str = field(
        default="no",
        metadata={
            "help": "Trainer checkpoints INSIDE a task (into output_dir/.trainer/<task>/, the resume point of an "
            "unfinished task); the runner itself saves after every task."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output_dir that holds another run (its files are deleted)."}
    )
    optim: str = field(
        default="adamw_torch",
        metadata={
            "help": "Optimizer of every task (any Trainer --optim; adamw_torch_fused is the Trainer's own default)."
        },
    )
    disable_tqdm: bool | None = field(
        default=True, metadata={"help": "Hide the Trainer's per-step progress bar (default: True)."}
    )

    # -- model, strategy and tasks ------------------------------------------------------------------------------
    model_name_or_path: str = field(
        default="minilm", metadata={"help": "Base model: a path, a Hub id, or the shipped 'minilm' / 'smollm2'."}
    )
    strategy: str = field(
        default="tss",
        metadata={
            "help": "A strategy declaring 'finetune' in its runners: tss, wsn, ft, ... "
            "(see hf_softmask.strategies.available_strategies())."
        },
    )
    strategy_kwargs: str | None = field(
        default=None,
        metadata={
            "help": 'JSON object of keyword settings for the strategy, e.g. \'{"mode": "grad"}\' (a mapping in YAML).'
        },
    )
    tasks: list[str] = field(
        default_factory=lambda: list(DEFAULT_TASKS),
        metadata={
            "help": "BBC News tasks in order, each a comma-separated list of topics (its classes), "
            "e.g. business,entertainment politics,sports."
        },
    )
    max_train_per_class: int | None = field(
        default=32, metadata={"help": "Training articles per class and task (None: all)."}
    )
    max_test_per_class: int | None = field(
        default=20, metadata={"help": "Test articles per class and task (None: all)."}
    )
    test_fraction: float = field(default=0.2, metadata={"help": "Fraction of each topic held out for testing."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/test split and subsampling."})
    max_length: int = field(default=64, metadata={"help": "Tokens per article (truncation)."})
    pooling: str = field(
        default="mean", metadata={"help": f"Pooling of the last hidden state for the heads: {', '.join(POOLINGS)}."}
    )
    head_learning_rate: float | None = field(
        default=5e-3, metadata={"help": "Learning rate of the task heads (None: learning_rate)."}
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads (default: torch's own choice)."}
    )
    register_architecture: str | None = field(
        default=None,
        metadata={
            "help": "module:function[,module:function] called before the "
            "model is loaded, to register a model type hf_softmask does not know."
        },
    )
    plots: bool = field(
        default=True, metadata={"help": "Write accuracy_matrix.png; needs the 'plots' extra (matplotlib)."}
    )

    def __post_init__(self):
        self.validate()
        refuse_unsupported_trainer_flags(self, "finetuning")
        use_cpu_without_cuda(self)
        super().__post_init__()
        refuse_fsdp1_flags(self, "finetuning")  # after the Trainer's own settings: their FSDP version

    def validate(self) -> None:
        """Every setting checked before anything is written; each error names the flag."""
        require_choice("pooling", self.pooling, POOLINGS)
        if self.plots:
            require("matplotlib", "--plots (accuracy_matrix.png)", "or pass --no_plots")
        require_steps(self.max_steps, self.num_train_epochs, "task")
        for name in (
            "max_length",
            "per_device_eval_batch_size",
            "learning_rate",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
        ):
            require_positive(name, getattr(self, name))
        for name in ("max_train_per_class", "max_test_per_class", "head_learning_rate", "num_threads"):
            require_positive(name, getattr(self, name), allow_none=True)
        for name in ("weight_decay", "max_grad_norm", "warmup_steps"):
            require_positive(name, getattr(self, name), allow_zero=True)
        if not (isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1):
            raise ValueError(f"--test_fraction must lie strictly between 0 and 1, got {self.test_fraction!r}")
        self.task_topics()
        self.strategy_settings()

    def strategy_settings(self) -> dict:
        return parse_strategy_kwargs(self.strategy_kwargs)

    def task_topics(self) -> list[list[str]]:
        tasks = [self.tasks] if isinstance(self.tasks, str) else self.tasks
        out = [[p.strip() for p in (t.split(",") if isinstance(t, str) else t) if p.strip()] for t in tasks]
        if not out:
            raise ValueError("--tasks is empty; give at least one task such as business,entertainment")
        return out

    def fingerprint(self) -> dict:
        """What a resumed run must match (state.json): the Trainer's allowlisted fields and the runner's own."""
        return {"runner": "continual_finetune", **fingerprint(self, NOT_IN_FINGERPRINT)}


def _encode(data: dict) -> dict:
    if "strategy_kwargs" in data:
        data["strategy_kwargs"] = strategy_kwargs_text(data["strategy_kwargs"])
    return data


def parse_finetuning_config(argv: list[str] | None = None) -> ContinualFinetuningArguments:
    """``--config file.yaml`` gives the defaults; every other flag overrides its YAML value."""
    return parse_with_yaml((ContinualFinetuningArguments,), argv, PROG, yaml_hook=_encode)[0]
