"""Settings of a continual pre-training run: ``TrainingArguments`` plus the runner's own fields.

Every Trainer flag (``--bf16``, ``--gradient_checkpointing``, ``--optim``, ``--report_to``, ``--fsdp``, ...) keeps its
usual meaning and reaches the Trainer of every domain; the per-domain meaning of steps, schedules and checkpoints
is in docs/runners.md. Flags the runner cannot honour are refused (:mod:`.cli`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

from transformers import TrainingArguments

from ...baselines.domain_training import DomainTrainingOptions
from ...core.softmask_arguments import SoftMaskArguments, flag_name
from ...utils.extras import require
from ..cli import (
    parse_float_list,
    parse_int_list,
    parse_str_list,
    parse_with_yaml,
    refuse_fsdp1_flags,
    refuse_unsupported_trainer_flags,
    require_choice,
    require_positive,
    require_steps,
    use_cpu_without_cuda,
)
from ..fingerprint import fingerprint
from ..renames import RENAMED, renamed
from ..strategy_settings import strategy_kwargs_text
from .das_arguments import DASArguments
from .frontier import row_name

__all__ = [
    "ContinualPretrainingArguments",
    "parse_config",
    "parse_float_list",
    "parse_int_list",
    "parse_str_list",
    "PROG",
]

PROG = "hf-softmask pretrain"

#: The runner's own fields that do not change what a run computes (they may differ when a run is resumed): where
#: output goes and what is written besides the results, sweep and study settings (each run of a sweep is
#: fingerprinted alone), the frontier's statistics, threads, the place of the merge snapshot, the compilation of the
#: mask update (the same maths), and old names (their value has moved to the new field). The Trainer fields of the
#: fingerprint are :data:`.fingerprint.TRAINER_FIELDS`.
RUNNER_NOT_IN_FINGERPRINT = frozenset(
    {
        "overwrite_output_dir",
        "plots",
        "keep_domain_weights",
        "learning_rates",
        "strategies",
        "frontier_runs",
        "seeds",
        "runs",
        "bootstrap_resamples",
        "bootstrap_confidence",
        "primary_comparison",
        "control_run",
        "sweep_shard",
        "num_threads",
        "register_architecture",
        "merge_snapshot_device",
        flag_name("compile_update"),
        "max_steps_per_domain",  # old names (.renames.RENAMED)
        "mask_power",
    }
)

#: Settings added after runs were first saved, with the value that reproduces those runs: a saved fingerprint
#: without the key is read as holding that value (so an old run resumes with the old evaluation, or is refused
#: naming the setting).
ADDED_SETTINGS = {"eval_blocks_per_document": 0, "general_eval_fraction": 0.3}

#: Keys of one entry of the YAML ``runs`` list (besides the DomainTrainingOptions fields).
RUN_KEYS = ("name", "strategy", "learning_rates", "strategy_kwargs")


def _option_help(name: str) -> str:
    return DomainTrainingOptions.__dataclass_fields__[name].metadata["help"]


def _help(text: str, choices=None) -> dict:
    return {"help": text, **({"choices": list(choices)} if choices else {})}


@dataclass
class ContinualPretrainingArguments(DASArguments, SoftMaskArguments, TrainingArguments):
    """Everything a continual pre-training run needs; every field is also a ``--flag`` that overrides the YAML.

    Trainer fields apply to each domain's Trainer: ``max_steps`` / ``num_train_epochs`` are per domain, the
    learning-rate schedule (warm-up included) restarts at every domain, ``save_steps`` checkpoints inside a domain.
    The soft-mask settings of ``das`` are the ``softmask_<name>`` fields of
    :class:`~hf_softmask.core.softmask_arguments.SoftMaskArguments`, its other runner flags (``contrastive_weight``,
    ``contrastive_temperature``, ``perturbation_dropout``) the fields of :class:`.das_arguments.DASArguments`.
    """

    #: List fields whose items never hold a comma: "a,b" also reads as two items (:func:`.cli.split_commas`).
    comma_separated_fields: ClassVar[tuple[str, ...]] = ("learning_rates", "strategies", "frontier_runs", "seeds")

    # -- Trainer fields whose defaults differ from TrainingArguments (CPU-sized, per domain) ----------------------
    output_dir: str | None = field(
        default="outputs/continual_pretrain",
        metadata=_help("Run directory: 0_base/, <k>_<domain>/ checkpoints, results.json, plots, state.json."),
    )
    max_steps: int = field(
        default=30,
        metadata=_help(
            "Optimizer steps PER DOMAIN (the schedule restarts at each domain); -1 trains num_train_epochs per domain."
        ),
    )
    num_train_epochs: float = field(default=1.0, metadata=_help("Epochs per domain when max_steps is -1."))
    per_device_eval_batch_size: int = field(default=16, metadata=_help("Batch size of the runner's evaluation."))
    save_steps: float = field(
        default=10, metadata=_help("Trainer checkpoint interval inside a domain (the resume point after a crash).")
    )
    logging_steps: float = field(default=10, metadata=_help("Trainer logging interval, in steps of the domain."))
    save_total_limit: int | None = field(default=1, metadata=_help("Trainer checkpoints kept inside a domain."))
    run_name: str | None = field(
        default=None,
        metadata=_help(
            "Label of the run in frontier tables and trackers (default: the strategy name); each domain's Trainer "
            "logs as <run_name>/<k>_<domain>."
        ),
    )
    optim: str = field(
        default="adamw_torch",
        metadata=_help(
            "Optimizer of every domain (any Trainer --optim; adamw_torch_fused is the Trainer's own default)."
        ),
    )

    # -- model and data ---------------------------------------------------------------------------------------
    model_name_or_path: str = field(
        default="minilm",
        metadata=_help("Checkpoint directory, or the shipped shortcuts 'minilm' (MLM) / 'smollm2' (causal LM)."),
    )
    objective: str = field(
        default="auto",
        metadata=_help(
            "'auto' (from the model: ForMaskedLM -> mlm, else clm), 'mlm' or 'clm'.", ("auto", "mlm", "clm")
        ),
    )
    domains: list[str] = field(
        default_factory=lambda: ["business", "sports", "tech"],
        metadata=_help(
            "Ordered domains: BBC topic names, 'name=/dir/or/glob*.txt', 'name=hf:<dataset or save_to_disk dir>'; "
            "in YAML also dicts accepted by hf_softmask.data.load_domains."
        ),
    )
    max_train_docs: int | None = field(
        default=None, metadata=_help("Cap on training documents per domain (default: all).")
    )
    max_eval_docs: int | None = field(
        default=None,
        metadata=_help(
            "Cap on held-out documents per domain and for general text (default: all). Studies need >= 32: the "
            "frontier's intervals resample documents."
        ),
    )
    eval_fraction: float = field(
        default=0.1, metadata=_help("Fraction of each domain's documents held out for evaluation.")
    )
    block_size: int = field(default=128, metadata=_help("Tokens per training/evaluation block."))
    max_train_blocks: int | None = field(
        default=None, metadata=_help("Cap on training blocks per domain (default: all).")
    )
    eval_blocks_per_document: int = field(
        default=2,
        metadata=_help(
            "Evaluation blocks cut from the start of each held-out document (a shorter document gives one padded "
            "block); the frontier's intervals resample documents. 0: the old evaluation, one token stream of all "
            "held-out documents cut into --max_eval_blocks blocks (runs made before this setting existed)."
        ),
    )
    max_eval_blocks: int | None = field(
        default=None,
        metadata=_help(
            "Cap on evaluation blocks per domain (and for general text), taken document by document (default: no "
            "cap; the old evaluation, --eval_blocks_per_document 0: 16)."
        ),
    )
    general_eval_fraction: float = field(
        default=0.5,
        metadata=_help(
            "Fraction of the general-text documents (the Python language reference topics) held out for evaluation; "
            "the rest feeds the LM-head warm-up, 'general' importance and general replay."
        ),
    )
    importance_blocks: int = field(
        default=128,
        metadata=_help(
            "Importance sample size: blocks used for each importance estimate (split across processes). 128 blocks "
            "of 128 tokens give normalized split-half >= 0.96 on MiniLM (docs/importance.md)."
        ),
    )
    general_importance_source: str = field(
        default="domain",
        metadata=_help(
            "Data for the general-knowledge (kl_dropout) importance: 'domain' (the first domain's training text, "
            "as in "
            "DAS) or 'general' (general text).",
            ("domain", "general"),
        ),
    )
    mlm_probability: float = field(default=0.15, metadata=_help("Masking probability for MLM models."))
    register_architecture: str | None = field(
        default=None,
        metadata=_help(
            "module:function[,module:function] called before the model is loaded, to register a model type that "
            "hf_softmask does not know (the function calls hf_softmask.register_architecture)."
        ),
    )

    # -- strategy ---------------------------------------------------------------------------------------------
    strategy: str = field(
        default="das",
        metadata=_help(
            "Strategy declaring 'pretrain' in hf_softmask.strategies.registry "
            "('das', 'ncl' = plain sequential training)."
        ),
    )
    strategy_kwargs: str | None = field(
        default=None,
        metadata=_help(
            "Extra keyword settings of the strategy, as a JSON object (in YAML also a mapping), "
            "e.g. '{\"ewc_lambda\": 100}'."
        ),
    )

    # -- runner -----------------------------------------------------------------------------------------------
    max_steps_per_domain: int | None = field(
        default=None,
        metadata=_help("Old name of --max_steps (per domain); a value <= 0 means -1. Prefer --max_steps."),
    )
    mask_power: float | None = field(
        default=None, metadata=_help("Old name of --softmask_mask_power (warns). Prefer --softmask_mask_power.")
    )
    lm_head_warmup_steps: int = field(
        default=0,
        metadata=_help(
            "Before anything else, fit the LM head alone (base frozen) on general text for this many steps (for "
            "checkpoints whose LM head is freshly initialised, e.g. the shipped MiniLM)."
        ),
    )
    lm_head_warmup_lr: float = field(default=1e-3, metadata=_help("Learning rate of the LM-head warm-up."))
    num_threads: int | None = field(
        default=None, metadata=_help("torch.set_num_threads for CPU runs (default: torch's own choice).")
    )
    plots: bool = field(
        default=True,
        metadata=_help("Write PNG plots (perplexity matrix, importance, frontier); needs the 'plots' extra."),
    )
    keep_domain_weights: str = field(
        default="all",
        metadata=_help(
            "'all': every <k>_<domain>/ keeps its weights; 'last': weights of earlier domains are deleted once the "
            "next "
            "one is saved (importance, card and config stay).",
            ("all", "last"),
        ),
    )
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("Start over in an output_dir that holds another run (its files are deleted).")
    )

    # -- sweep ------------------------------------------------------------------------------------------------
    learning_rates: list[float] | None = field(
        default=None,
        metadata=_help(
            "Learning rates (--learning_rates 1e-4 5e-5, or 1e-4,5e-5): run every (strategy, lr) into its own "
            "subdirectory and write frontier.json/.md/.png."
        ),
    )
    strategies: list[str] | None = field(
        default=None,
        metadata=_help("Strategies for the sweep (default: the single --strategy)."),
    )
    frontier_runs: list[str] | None = field(
        default=None,
        metadata=_help(
            "Run directories or globs with results.json: only (re)write the frontier of these runs into "
            "output_dir, train nothing."
        ),
    )
    seeds: list[int] | None = field(
        default=None,
        metadata=_help(
            "Seeds (--seeds 0 1 2, or 0,1,2): every (strategy, lr) of the sweep runs once per seed into "
            "<strategy>_lr<lr>_s<seed>/ (training randomness only: the data split and evaluation blocks stay "
            "those of --split_seed, so all seeds are evaluated on the same blocks)."
        ),
    )
    split_seed: int | None = field(
        default=None,
        metadata=_help(
            "Seed of the document split and evaluation blocks (default: --seed; a --seeds sweep keeps it "
            "at the sweep's --seed)."
        ),
    )
    runs: str | None = field(
        default=None,
        metadata=_help(
            "Sweep entries, a JSON list (in YAML a list of mappings) of {name, strategy, learning_rates, "
            "strategy_kwargs, replay_ratio, replay_general, merge_alpha, ema_decay}; each overrides the shared "
            "settings and is swept over its own learning rates (and the seeds). 'name' labels it in the frontier; "
            "the frontier runs are those named 'ncl'."
        ),
    )
    bootstrap_resamples: int = field(
        default=2000, metadata=_help("Bootstrap resamples of the frontier's confidence intervals.")
    )
    bootstrap_confidence: float = field(default=0.95, metadata=_help("Level of the frontier's intervals."))
    sweep_shard: str | None = field(
        default=None,
        metadata=_help(
            "'i/n': run only every n-th run of the sweep, starting at the i-th (0-based), so n processes share a "
            "machine (on 2 cores two processes at --num_threads 1 finish a study sooner than one at 2: "
            "docs/statistics.md); the shard that finishes the last run writes the frontier."
        ),
    )
    primary_comparison: str | None = field(
        default=None,
        metadata=_help(
            "The study's one question, named before running: a runs entry name (its learning rates form the primary "
            "family, Holm within it) or one row 'name@lr'. It is tested at 1 - bootstrap_confidence; every other "
            "row's verdict is Holm-adjusted over the other rows (docs/statistics.md)."
        ),
    )
    control_run: str | None = field(
        default=None,
        metadata=_help(
            "A runs entry of plain training (strategy ncl) at learning rates left out of the frontier, judged like "
            "any method: it must not read beyond (a frontier that flatters is caught)."
        ),
    )

    # -- baselines (hf_softmask.baselines.domain_training; docs/baselines.md) ---------------------------------
    replay_ratio: float = field(default=0.0, metadata=_help(_option_help("replay_ratio")))
    replay_general: bool = field(default=False, metadata=_help(_option_help("replay_general")))
    merge_alpha: float = field(default=1.0, metadata=_help(_option_help("merge_alpha")))
    ema_decay: float = field(default=0.0, metadata=_help(_option_help("ema_decay")))
    merge_snapshot_device: str | None = field(
        default=None, metadata=_help(_option_help("merge_snapshot_device"), ("cpu", "cuda"))
    )

    def __post_init__(self):
        if isinstance(self.domains, str):
            self.domains = [self.domains]
        # "--domains business,sports" and "--domains business sports" mean the same, "name=source" entries included
        # (a source with a comma in it needs the YAML form {name: ..., path: ...}).
        self.domains = [part for d in self.domains for part in (parse_str_list(d) if isinstance(d, str) else [d])]
        # Lists given in Python as "a,b" strings (flags and YAML are split by the parser) read as on the command line.
        self.learning_rates = parse_float_list(self.learning_rates, "learning_rates") or None
        self.strategies = parse_str_list(self.strategies) or None
        self.frontier_runs = parse_str_list(self.frontier_runs) or None
        self.seeds = parse_int_list(self.seeds, "seeds") or None
        # An old name given as a flag or in Python (YAML is renamed before parsing, so that flags override it).
        names = {f.name for f in fields(self)}
        given = {old: getattr(self, old) for old in RENAMED if old in names and getattr(self, old) is not None}
        for name, value in renamed(given, names).items():
            setattr(self, name, value)
        for old in given:
            setattr(self, old, None)
        self.validate()
        refuse_unsupported_trainer_flags(self, "pre-training")
        use_cpu_without_cuda(self)
        super().__post_init__()
        refuse_fsdp1_flags(self, "pre-training")  # after the Trainer's own settings: their FSDP version

    def validate(self) -> None:
        """Every setting checked before anything is written; each error names the flag."""
        if not self.domains:
            raise ValueError("--domains is empty: give at least one domain (e.g. --domains business sports tech)")
        require_choice("objective", self.objective, ("auto", "mlm", "clm"))
        require_choice("general_importance_source", self.general_importance_source, ("domain", "general"))
        require_choice("keep_domain_weights", self.keep_domain_weights, ("all", "last"))
        if self.plots:
            require("matplotlib", "--plots (PNG plots)", "or pass --no_plots")
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if self.block_size is None or self.block_size < 2:
            raise ValueError(f"--block_size must be >= 2, got {self.block_size}")
        require_steps(self.max_steps, self.num_train_epochs, "domain")
        for name in (
            "learning_rate",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "importance_blocks",
            flag_name("mask_power"),
            "lm_head_warmup_lr",
            "save_steps",
            "logging_steps",
        ):
            require_positive(name, getattr(self, name))
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "lm_head_warmup_steps"):
            require_positive(name, getattr(self, name), allow_zero=True)
        for name in ("max_train_docs", "max_eval_docs", "max_train_blocks", "max_eval_blocks", "num_threads"):
            require_positive(name, getattr(self, name), allow_none=True)
        require_positive("eval_blocks_per_document", self.eval_blocks_per_document, allow_zero=True)
        for name in ("eval_fraction", "general_eval_fraction", "mlm_probability"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
                raise ValueError(f"--{name} must lie strictly between 0 and 1, got {value!r}")
        self.das_settings()  # the DAS flags (das_arguments.DAS_FLAGS), by DASConfig's checks
        for lr in self.learning_rates or []:
            require_positive("learning_rates", lr)
        self.softmask_config()  # modes and policies
        self.domain_training_options()
        if self.bootstrap_resamples is None or self.bootstrap_resamples < 1:
            raise ValueError(f"--bootstrap_resamples must be >= 1, got {self.bootstrap_resamples!r}")
        if not (isinstance(self.bootstrap_confidence, float) and 0 < self.bootstrap_confidence < 1):
            raise ValueError(
                f"--bootstrap_confidence must lie strictly between 0 and 1, got {self.bootstrap_confidence!r}"
            )
        seeds = self.seed_list()
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds repeats a seed: {seeds}")
        self.runs = parse_runs(self.runs)
        if self.runs and (self.strategies or self.learning_rates):
            raise ValueError(
                "--runs gives every sweep entry its strategy and learning rates: drop --strategies and "
                "--learning_rates (or drop --runs)"
            )
        for run in self.sweep_entries():
            self.for_entry(run, run["learning_rates"][0], validate_only=True)
        self._check_study_rows()
        self.shard()

    def shard(self) -> tuple[int, int]:
        """``(i, n)`` of ``sweep_shard`` (``(0, 1)`` when unset), checked."""
        if not self.sweep_shard:
            return 0, 1
        try:
            i, n = (int(x) for x in str(self.sweep_shard).split("/"))
        except ValueError:
            raise ValueError(f"--sweep_shard must read i/n (e.g. 0/2), got {self.sweep_shard!r}") from None
        if not 0 <= i < n:
            raise ValueError(f"--sweep_shard {self.sweep_shard!r}: need 0 <= i < n")
        return i, n

    def _check_study_rows(self) -> None:
        """``primary_comparison`` and ``control_run`` name rows this sweep makes (a pure --frontier_runs rewrite
        is checked when the frontier is written); the control is plain training off the frontier's grid."""
        if not self.runs:
            return
        entries = {e["name"]: e for e in self.runs}
        frontier_lrs = entries.get("ncl", {}).get("learning_rates", [])
        if self.primary_comparison:
            try:
                name, lr = row_name(self.primary_comparison)
            except ValueError as e:
                raise ValueError(f"--primary_comparison {e}") from None
            if name not in entries or name == "ncl":
                raise ValueError(
                    f"--primary_comparison {self.primary_comparison!r}: names no runs entry other than the frontier "
                    f"(entries: {sorted(entries)})"
                )
            if lr is not None and not any(math.isclose(lr, x) for x in entries[name]["learning_rates"]):
                raise ValueError(
                    f"--primary_comparison {self.primary_comparison!r}: {name} runs at "
                    f"{entries[name]['learning_rates']}"
                )
        if self.control_run:
            entry = entries.get(self.control_run)
            if entry is None or entry.get("strategy") != "ncl" or self.control_run == "ncl":
                raise ValueError(
                    f"--control_run {self.control_run!r}: must name a runs entry of strategy ncl other than 'ncl' "
                    "(the frontier)"
                )
            shared = [x for x in entry["learning_rates"] if any(math.isclose(x, f) for f in frontier_lrs)]
            if shared:
                raise ValueError(f"--control_run {self.control_run!r}: learning rates {shared} are on the frontier")

    def domain_training_options(self) -> DomainTrainingOptions:
        """Replay / WiSE-FT / EMA settings, validated by :class:`DomainTrainingOptions` (errors name the flag)."""
        values = {f.name: getattr(self, f.name) for f in fields(DomainTrainingOptions)}
        try:
            return _check_options(values, self.per_device_train_batch_size)
        except ValueError as e:
            raise ValueError(f"--{e}") from None

    def seed_list(self) -> list[int]:
        return list(self.seeds or [])

    def sweep_entries(self) -> list[dict]:
        """The sweep's entries: the ``runs`` list, else one per ``--strategies`` with ``--learning_rates``."""
        if self.runs:
            return self.runs
        lrs = self.learning_rates or [self.learning_rate]
        return [{"name": s, "strategy": s, "learning_rates": lrs} for s in self.strategies or [self.strategy]]

    def for_entry(self, entry: dict, lr: float, validate_only: bool = False):
        """The settings of one sweep run: ``entry``'s overrides at learning rate ``lr`` (checked)."""
        from dataclasses import replace

        over = {k: v for k, v in entry.items() if k not in ("name", "learning_rates")}
        if "strategy_kwargs" in over:
            over["strategy_kwargs"] = strategy_kwargs_text(over["strategy_kwargs"])
        if validate_only:
            values = {n: over.get(n, getattr(self, n)) for n in (f.name for f in fields(DomainTrainingOptions))}
            try:
                _check_options(values, self.per_device_train_batch_size)
            except ValueError as e:
                raise ValueError(f"runs entry {entry.get('name')!r}: {e}") from None
            require_positive("learning_rates", lr)
            return None
        return replace(
            self,
            learning_rate=lr,
            learning_rates=None,
            strategies=None,
            runs=None,
            seeds=None,
            run_name=entry.get("name") or over.get("strategy", self.strategy),
            **over,
        )

    def fingerprint(self) -> dict:
        """The settings that decide what the run computes (a resumed run must match them)."""
        return fingerprint(self, RUNNER_NOT_IN_FINGERPRINT)


def _check_options(values: dict, batch_size: int) -> DomainTrainingOptions:
    """DomainTrainingOptions' own checks, and that the replay ratio gives whole rows of a batch."""
    from ...baselines.replay import replay_rows_per_batch

    options = DomainTrainingOptions(**values)
    if options.replay_ratio > 0:
        replay_rows_per_batch(options.replay_ratio, batch_size)
    return options


def parse_runs(value) -> list[dict] | None:
    """The ``runs`` setting (JSON text or a YAML list) as a list of checked entries, or None."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--runs must be a JSON list of mappings, got {value!r}: {e}") from None
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise ValueError(f"--runs must be a list of mappings, got {value!r}")
    allowed = set(RUN_KEYS) | {f.name for f in fields(DomainTrainingOptions)}
    out = []
    for r in value:
        unknown = sorted(set(r) - allowed)
        if unknown:
            raise ValueError(f"runs entry {r.get('name')!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if not r.get("strategy"):
            raise ValueError(f"runs entry {r.get('name')!r}: 'strategy' is required")
        lrs = parse_float_list(r.get("learning_rates"))
        if not lrs:
            raise ValueError(f"runs entry {r.get('name')!r}: 'learning_rates' is required (a list of numbers)")
        out.append({**r, "name": str(r.get("name") or r["strategy"]), "learning_rates": lrs})
    names = [r["name"] for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"runs: names must be unique, got {names}")
    return out


def parse_config(argv: list[str] | None = None) -> ContinualPretrainingArguments:
    """``--config file.yaml`` gives the defaults; every other flag overrides its YAML value."""
    return parse_with_yaml((ContinualPretrainingArguments,), argv, PROG)[0]
