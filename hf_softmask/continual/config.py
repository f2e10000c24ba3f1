"""Configuration of a continual pre-training run: one dataclass, read from YAML and overridable by flags."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..masking import SoftMaskConfig

__all__ = ["ContinualPretrainingArguments", "parse_config", "parse_float_list", "parse_str_list"]


@dataclass
class ContinualPretrainingArguments:
    """Everything a continual pre-training run needs. Every field is also a ``--flag`` that overrides the YAML."""

    # -- model and data ---------------------------------------------------------------------------------------
    model_name_or_path: str = field(default="minilm", metadata={"help": "Checkpoint directory, or the shipped shortcuts 'minilm' (MLM) / 'smollm2' (causal LM)."})
    objective: str = field(default="auto", metadata={"help": "'auto' (from the model: ForMaskedLM -> mlm, else clm), 'mlm' or 'clm'."})
    domains: list[str] = field(default_factory=lambda: ["business", "sports", "tech"], metadata={"help": "Ordered domains: BBC topic names, 'name=/dir/or/glob*.txt', 'name=hf:<dataset or save_to_disk dir>'; in YAML also dicts accepted by hf_softmask.data.load_domains."})
    max_train_docs: int | None = field(default=None, metadata={"help": "Cap on training documents per domain."})
    max_eval_docs: int | None = field(default=None, metadata={"help": "Cap on held-out documents per domain."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Fraction of each domain's documents held out for evaluation."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training/evaluation block."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Cap on training blocks per domain."})
    max_eval_blocks: int = field(default=16, metadata={"help": "Evaluation blocks per domain (and for general text)."})
    importance_blocks: int = field(default=64, metadata={"help": "Importance sample size: blocks used for each importance estimate (split across processes)."})
    general_importance_source: str = field(default="domain", metadata={"help": "Data for the general-knowledge (kl_dropout) importance: 'domain' (the first domain's training text, as in DAS) or 'general' (general text)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Masking probability for MLM models."})

    # -- strategy ---------------------------------------------------------------------------------------------
    strategy: str = field(default="das", metadata={"help": "Strategy name from hf_softmask.strategies.registry declaring 'pretrain' ('das', 'ncl' = plain sequential training)."})
    strategy_kwargs: str | None = field(default=None, metadata={"help": "Extra keyword settings of the strategy, as a JSON object (in YAML also a mapping), e.g. '{\"ewc_lambda\": 100}'."})
    softmask_mode: str = field(default="update", metadata={"help": SoftMaskConfig.__dataclass_fields__["mode"].metadata["help"]})
    softmask_embeddings: str = field(default="train", metadata={"help": "Embeddings policy: train | freeze | mean."})
    softmask_norms: str = field(default="train", metadata={"help": "LayerNorm/RMSNorm policy: train | freeze | mean."})
    softmask_task_head: str = field(default="train", metadata={"help": "LM-head policy: train | freeze | mean."})
    softmask_other: str = field(default="train", metadata={"help": "Policy for other unowned parameters: train | freeze | mean."})
    mask_power: float = field(default=1.0, metadata={"help": "Soft mask = 1 - I**mask_power."})
    contrastive_weight: float = field(default=1.0, metadata={"help": "λ of the DAS contrastive term (0 = off)."})
    contrastive_temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (cosine similarity)."})
    perturbation_dropout: float = field(default=0.1, metadata={"help": "Dropout on unit outputs for models without dropout (importance views and contrastive views)."})

    # -- training ---------------------------------------------------------------------------------------------
    max_steps_per_domain: int = field(default=30, metadata={"help": "Optimizer steps per domain; <= 0 trains num_train_epochs per domain instead."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs per domain when max_steps_per_domain <= 0."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Evaluation batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule within each domain."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up fraction of each domain's steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    lm_head_warmup_steps: int = field(default=0, metadata={"help": "Before anything else, fit the LM head alone (base frozen) on general text for this many steps (for checkpoints whose LM head is freshly initialised, e.g. the shipped MiniLM)."})
    lm_head_warmup_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the LM-head warm-up."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads for CPU runs (None: torch's default)."})

    # -- output -----------------------------------------------------------------------------------------------
    output_dir: str = field(default="outputs/continual_pretrain", metadata={"help": "Run directory: <k>_<domain>/ checkpoints, results.json, plots, state.json."})
    run_name: str | None = field(default=None, metadata={"help": "Label of this run in frontier tables (default: the strategy name)."})
    save_steps: int = field(default=10, metadata={"help": "Trainer checkpoint interval inside a domain (resume point after a crash)."})
    logging_steps: int = field(default=10, metadata={"help": "Trainer logging interval."})
    plots: bool = field(default=True, metadata={"help": "Write PNG plots (perplexity matrix, importance heatmaps)."})
    keep_domain_weights: str = field(default="all", metadata={"help": "'all': every <k>_<domain>/ keeps its weights; 'last': weights of earlier domains are deleted once the next one is saved (importance, card and config stay)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Publish every domain checkpoint to the Hub as <hub_model_id>-<k>-<domain>."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id prefix for --push_to_hub."})
    hub_private: bool = field(default=False, metadata={"help": "Create private Hub repos."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})

    # -- sweep ------------------------------------------------------------------------------------------------
    learning_rates: str | None = field(default=None, metadata={"help": "Comma-separated learning rates: run every (strategy, lr) into its own subdirectory and write frontier.json/.md/.png."})
    strategies: str | None = field(default=None, metadata={"help": "Comma-separated strategies for the sweep (default: the single --strategy)."})
    frontier_runs: str | None = field(default=None, metadata={"help": "Comma-separated run directories or globs with results.json: only (re)write the frontier of these runs into output_dir, train nothing."})

    def __post_init__(self):
        if isinstance(self.domains, str):
            self.domains = [self.domains]
        # "--domains business,sports" and "--domains business sports" mean the same; "name=source" stays whole.
        self.domains = [part for d in self.domains for part in (parse_str_list(d) if isinstance(d, str) and "=" not in d else [d])]
        if not self.domains:
            raise ValueError("domains is empty: give at least one domain (e.g. --domains business sports tech)")
        if self.objective not in ("auto", "mlm", "clm"):
            raise ValueError(f"objective must be 'auto', 'mlm' or 'clm', got {self.objective!r}")
        if self.general_importance_source not in ("domain", "general"):
            raise ValueError(f"general_importance_source must be 'domain' or 'general', got {self.general_importance_source!r}")
        if self.keep_domain_weights not in ("all", "last"):
            raise ValueError(f"keep_domain_weights must be 'all' or 'last', got {self.keep_domain_weights!r}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (the repo id prefix, e.g. 'me/minilm-das')")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        self.softmask_config()  # validates modes and policies early

    def softmask_config(self) -> SoftMaskConfig:
        return SoftMaskConfig(mode=self.softmask_mode, embeddings=self.softmask_embeddings, norms=self.softmask_norms,
                              task_head=self.softmask_task_head, other=self.softmask_other, mask_power=self.mask_power)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_float_list(value) -> list[float]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [float(v) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {value!r}") from None


def parse_str_list(value) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def parse_config(argv: list[str] | None = None) -> ContinualPretrainingArguments:
    """``--config file.yaml`` gives the defaults; every other flag overrides its YAML value."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ContinualPretrainingArguments)
    parser.add_argument("--config", default=None, help="YAML file of ContinualPretrainingArguments fields.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        data = yaml.safe_load(Path(known.config).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{known.config}: expected a mapping of field: value at the top level")
        names = {f.name for f in fields(ContinualPretrainingArguments)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{known.config}: unknown field(s) {unknown}; run with --help for the list of fields")
        # argparse converts only string defaults; YAML lists (domains as dicts, learning_rates) pass through as is.
        parser.set_defaults(**data)
    # The --config flag itself comes back as an extra namespace after the dataclass.
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)[0]
