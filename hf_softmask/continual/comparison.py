"""Every strategy on the same sequences: continual pre-training and continual finetuning, one table.

For each strategy and each setting it declares (``settings``), the setting's runner is called with the same
data, model and budget (:mod:`hf_softmask.continual.pretraining.runner`, :mod:`hf_softmask.continual.finetuning`); the
record keeps the final score (mean held-out loss / perplexity, or accuracy), BWT, forgetting, wall time and
peak memory. Plain sequential training is also run over a learning-rate grid in both settings (``ncl`` in
pre-training, ``ft`` in finetuning): every other run is placed against that frontier (beyond / on / behind /
undecided, :mod:`hf_softmask.continual.pretraining.frontier`), not against one plain run, because strategies that lower
the effective learning rate of protected units (``changes_effective_lr``) buy less forgetting the way a lower
learning rate does.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch

from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.memory import peak_rss_bytes, reset_peak_rss
from .pretraining.frontier import frontier_position
from .strategy_settings import parse_json_object

__all__ = [
    "CompareArguments",
    "compare_parser",
    "parse_compare_args",
    "run_comparison",
    "frontier_position",
    "peak_memory",
    "in_task_error",
    "STRATEGY_DEFAULTS",
    "DEFAULT_STRATEGIES",
    "FRONTIER",
]

PROG = "hf-softmask compare"

DEFAULT_STRATEGIES = ["ncl", "das", "tss", "wsn", "hat", "adahat", "cbp", "talos", "ewc", "kd"]

#: The finetuning configs shipped for strategies that train subnetwork scores: their ``strategy_kwargs`` and
#: ``learning_rate`` are the comparison's for that strategy (read from the YAML, the one place they are written).
SHIPPED_FINETUNE_CONFIGS = ("finetune_default", "finetune_wsn")


def _shipped_finetune_settings() -> tuple[dict[str, dict], dict[str, float]]:
    """``({strategy: strategy_kwargs}, {strategy: learning_rate})`` of :data:`SHIPPED_FINETUNE_CONFIGS`."""
    import yaml

    from ..utils.package_data import config_file

    kwargs, lrs = {}, {}
    for name in SHIPPED_FINETUNE_CONFIGS:
        data = yaml.safe_load(config_file(name).read_text())
        kwargs[data["strategy"]] = dict(data.get("strategy_kwargs") or {})
        lrs[data["strategy"]] = float(data["learning_rate"])
    return kwargs, lrs


_SHIPPED_KWARGS, _SHIPPED_LR = _shipped_finetune_settings()

#: Settings used for each strategy unless --strategy_kwargs overrides them: sized for short CPU runs (a few
#: dozen steps per task), where e.g. CBP's default maturity of 100 steps would never replace anything.
STRATEGY_DEFAULTS: dict[str, dict[str, dict]] = {
    "pretrain": {
        "cbp": {"replacement_rate": 1e-3, "maturity_threshold": 10},
        "talos": {"keep_fraction": 0.1, "rounds": 2, "examples_per_round": 16},
        "ewc": {"ewc_lambda": 0.1, "fisher_examples": 16},
        "kd": {"kd_weight": 1.0, "kd_temperature": 2.0},
    },
    "finetune": {
        **_SHIPPED_KWARGS,  # tss, wsn: configs/finetune_default.yaml, configs/finetune_wsn.yaml
        "cbp": {"replacement_rate": 1e-3, "maturity_threshold": 5},
        "talos": {"keep_fraction": 0.1, "rounds": 2, "examples_per_round": 16},
        "ewc": {"ewc_lambda": 0.1, "fisher_examples": 16},
        "kd": {"kd_weight": 1.0, "kd_temperature": 2.0},
    },
}

#: Backbone learning rate per strategy in finetuning (the shipped configs' values): TSS trains mask scores,
#: which need a far larger step than the weights the other strategies train.
FINETUNE_LR = dict(_SHIPPED_LR)
FINETUNE_WEIGHT_LR = 1e-4

#: Per setting: the plain-training baseline of the frontier and the (x, y) axes a run is placed by
#: (both lower-is-better).
FRONTIER = {"pretrain": ("ncl", "in_domain_loss", "forgetting"), "finetune": ("ft", "in_task_error", "forgetting")}


@dataclass
class CompareArguments:
    """What to compare and at which size. Every field is a ``--flag``."""

    output_dir: str = field(
        default="outputs/compare_strategies",
        metadata={"help": "Where comparison.json/.md and one run directory per (setting, strategy) go."},
    )
    strategies: list[str] = field(
        default_factory=lambda: list(DEFAULT_STRATEGIES),
        metadata={
            "help": "Strategy names (--strategies ncl hat, or ncl,hat); each runs in every setting it declares "
            "('ncl' runs as 'ft' in finetuning)."
        },
    )
    settings: list[str] = field(
        default_factory=lambda: ["pretrain", "finetune"], metadata={"help": "Settings to run: pretrain, finetune."}
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "Tiny sizes (a randomly initialised 2-layer BERT with MiniLM's tokenizer, a few steps): "
            "a smoke test, not a measurement."
        },
    )
    pretrain_config: str | None = field(
        default="configs/default.yaml",
        metadata={"help": "YAML of ContinualPretrainingArguments the pre-training runs start from."},
    )
    finetune_config: str | None = field(
        default="configs/finetune_default.yaml",
        metadata={"help": "YAML of the finetuning runner's arguments the finetuning runs start from."},
    )
    pretrain_overrides: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of ContinualPretrainingArguments fields applied on top (e.g. '{\"max_steps\": 20}')."
        },
    )
    finetune_overrides: str | None = field(
        default=None, metadata={"help": "JSON object of finetuning arguments applied on top."}
    )
    strategy_kwargs: str | None = field(
        default=None,
        metadata={"help": "JSON object {strategy: {setting: value}} overriding STRATEGY_DEFAULTS in both settings."},
    )
    frontier_lr_factors: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0],
        metadata={
            "help": "Plain training (ncl / ft) runs at its learning rate times each factor, "
            "in every setting: the frontier."
        },
    )
    frontier_tolerance: float = field(
        default=0.005,
        metadata={
            "help": "Pre-training: difference (nats, either axis) within which a run counts as ON the frontier."
        },
    )
    finetune_frontier_tolerance: float = field(
        default=0.01,
        metadata={
            "help": "Finetuning: difference (accuracy points, either axis) "
            "within which a run counts as ON the frontier."
        },
    )
    num_threads: int | None = field(default=2, metadata={"help": "torch.set_num_threads for the runs."})

    #: List fields whose items never hold a comma: "a,b" also reads as two items (:func:`.continual.cli.split_commas`).
    comma_separated_fields: ClassVar[tuple[str, ...]] = ("strategies", "settings", "frontier_lr_factors")

    def __post_init__(self):
        # Lists given in Python as "a,b" strings read as on the command line.
        from .cli import parse_float_list, parse_str_list

        self.strategies = parse_str_list(self.strategies)
        self.settings = parse_str_list(self.settings)
        self.frontier_lr_factors = parse_float_list(self.frontier_lr_factors, "frontier_lr_factors")


def compare_parser():
    """The command line of :class:`CompareArguments` (its --help is stored as package data)."""
    from .cli import make_parser

    return make_parser(CompareArguments, PROG)


def parse_compare_args(argv: list[str] | None = None) -> CompareArguments:
    """The comparison's arguments; an unknown flag or a bad value raises SettingError (one line on the console)."""
    from .cli import parse_args

    (args,) = parse_args(compare_parser(), sys.argv[1:] if argv is None else list(argv))
    return args


# -- memory --------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    peak = peak_rss_bytes()
    if peak is not None:
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class peak_memory:
    """Context manager measuring the peak resident memory (and peak CUDA memory) of the enclosed work.

    ``rss_scope`` is ``"run"`` when the peak counter could be reset at entry, ``"process"`` otherwise (then
    the value is the process's peak so far, an upper bound).
    """

    def __enter__(self):
        gc.collect()
        self.rss_scope = "run" if reset_peak_rss() else "process"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.peak_rss_mb = _peak_rss_mb()
        self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        return False


# -- runs ----------------------------------------------------------------------------------------------------
def _load_yaml(path: str | None, flag: str) -> dict:
    if not path:
        return {}
    import yaml

    from ..utils.package_data import config_file

    try:
        p = config_file(path, flag)  # a file, or a shipped config by name
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; pass {flag} '' to use the runner's defaults") from None
    return yaml.safe_load(p.read_text()) or {}


def tiny_model_dir(directory: Path) -> str:
    """A randomly initialised 2-layer BERT (MLM) with the shipped MiniLM's tokenizer, for --quick."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from ..utils.assets import minilm_path

    if (directory / "config.json").is_file():
        return str(directory)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertForMaskedLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


QUICK_PRETRAIN = dict(
    domains=["business", "sports"],
    max_train_docs=16,
    max_eval_docs=4,
    block_size=32,
    max_train_blocks=16,
    max_eval_blocks=2,
    importance_blocks=4,
    max_steps=3,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    lm_head_warmup_steps=0,
    save_steps=1000,
    logging_steps=1000,
    learning_rate=1e-3,
)
QUICK_FINETUNE = dict(
    tasks=["business,entertainment", "politics,sports"],
    max_train_per_class=4,
    max_test_per_class=4,
    max_length=32,
    num_train_epochs=1,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=8,
    logging_steps=1000,
)
QUICK_STRATEGY = {
    "talos": {"examples_per_round": 4},
    "ewc": {"fisher_examples": 4},
    "cbp": {"maturity_threshold": 1, "replacement_rate": 0.05},
}


def _strategy_settings(name: str, setting: str, user: dict, quick: bool) -> dict:
    kw = dict(STRATEGY_DEFAULTS.get(setting, {}).get(name, {}))
    if quick:
        kw.update(QUICK_STRATEGY.get(name, {}))
    kw.update(user.get(name, {}))
    return kw


def _run_pretrain(name: str, lr: float | None, base: dict, kwargs: dict, out: Path):
    from .pretraining.config import ContinualPretrainingArguments
    from .pretraining.pretrainer import ContinualPretrainer

    fields_ok = {f.name for f in fields(ContinualPretrainingArguments)}
    unknown = sorted(set(base) - fields_ok)
    if unknown:
        raise ValueError(f"unknown ContinualPretrainingArguments field(s) {unknown}")
    args = ContinualPretrainingArguments(
        **{
            **base,
            "strategy": name,
            "output_dir": str(out),
            "learning_rates": None,
            "strategies": None,
            "frontier_runs": None,
            "run_name": name,
            "strategy_kwargs": json.dumps(kwargs) if kwargs else None,
            **({"learning_rate": lr} if lr is not None else {}),
        }
    )
    return ContinualPretrainer(args).run(), args.learning_rate


def _run_finetune(name: str, lr: float | None, base: dict, kwargs: dict, out: Path):
    from .finetuning import ContinualFinetuningArguments, run_continual_finetuning

    unknown = sorted(set(base) - {f.name for f in fields(ContinualFinetuningArguments)})
    if unknown:
        raise ValueError(f"unknown ContinualFinetuningArguments field(s) {unknown}")
    values = {**base, "strategy": name, "strategy_kwargs": json.dumps(kwargs) if kwargs else None}
    values.setdefault("learning_rate", FINETUNE_LR.get(name, FINETUNE_WEIGHT_LR))
    if lr is not None:
        values["learning_rate"] = lr
    args = ContinualFinetuningArguments(**{**values, "output_dir": str(out), "report_to": "none"})
    return run_continual_finetuning(args), args.learning_rate


def _record(
    setting: str,
    name: str,
    lr,
    result: dict | None,
    mem: peak_memory,
    seconds: float,
    out: Path,
    kwargs: dict,
    error: str | None,
) -> dict:
    from ..strategies.registry import strategy_class

    cls = strategy_class(name)
    rec = {
        "setting": setting,
        "strategy": name,
        "learning_rate": lr,
        "changes_effective_lr": bool(cls.changes_effective_lr),
        "strategy_settings": kwargs,
        "wall_seconds": round(seconds, 2),
        "peak_rss_mb": round(mem.peak_rss_mb, 1),
        "rss_scope": mem.rss_scope,
        "peak_gpu_mb": mem.peak_gpu_mb,
        "run_dir": str(out),
        "error": error,
    }
    if result:
        if setting == "pretrain":
            fm = result.get("final_mean_loss")
            rec.update(
                {
                    "final_mean_loss": fm,
                    "final_perplexity": math.exp(fm) if fm is not None else None,
                    "in_domain_loss": result.get("in_domain_loss"),
                    "bwt": result.get("bwt"),
                    "forgetting": result.get("forgetting"),
                    "general_loss_increase": result.get("general_loss_increase"),
                    "complete": result.get("complete"),
                }
            )
        else:
            rec.update(
                {
                    "acc": result.get("acc"),
                    "bwt": result.get("bwt"),
                    "forgetting": result.get("forgetting"),
                    "fwt": result.get("fwt"),
                    "in_task_error": in_task_error(result.get("accuracy_matrix")),
                    "accuracy_matrix": result.get("accuracy_matrix"),
                }
            )
    return rec


def in_task_error(accuracy_matrix) -> float | None:
    """``1 - mean_j A[j][j]``: the error on each task right after training on it (the finetuning frontier's x axis)."""
    if not accuracy_matrix:
        return None
    return 1.0 - sum(accuracy_matrix[j][j] for j in range(len(accuracy_matrix))) / len(accuracy_matrix)


def _one(setting: str, name: str, lr, base: dict, kwargs: dict, out: Path) -> dict:
    error, result, used_lr = None, None, lr
    t0 = time.time()
    with peak_memory() as mem:
        try:
            if setting == "pretrain":
                result, used_lr = _run_pretrain(name, lr, base, kwargs, out)
            else:
                result, used_lr = _run_finetune(name, lr, base, kwargs, out)
        except Exception as e:  # one failing strategy must not stop the comparison; the record says why
            error = f"{type(e).__name__}: {e}"
            atomic_write_text(out.parent / f"{out.name}.error.txt", traceback.format_exc())
    return _record(setting, name, used_lr, result, mem, time.time() - t0, out, kwargs, error)


# -- the comparison ------------------------------------------------------------------------------------------
def run_comparison(args: CompareArguments) -> dict:
    """Run every (setting, strategy), write ``comparison.json`` and ``comparison.md`` into ``args.output_dir``."""
    from ..strategies.registry import strategy_class
    from .cli import user_errors

    with user_errors():  # settings, strategy names, YAML files and the --quick model: before any run starts
        out, settings, names, user, pre, fine = _start(args)

    records: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for setting in settings:
        for name in names:
            run_name = "ft" if (setting == "finetune" and name == "ncl") else name
            if setting not in strategy_class(run_name).runners:
                continue
            kwargs = _strategy_settings(run_name, setting, user, args.quick)
            print(f"[compare] {setting}: {run_name} {kwargs or ''}", flush=True)
            records.append(
                _one(setting, run_name, None, pre if setting == "pretrain" else fine, kwargs, out / setting / run_name)
            )
            _write(out, records, args, started)
        if not any(r["setting"] == setting for r in records):
            continue  # no strategy of this setting ran: nothing to place
        records.extend(_frontier_runs(args, setting, pre if setting == "pretrain" else fine, out, records))
        tol = args.frontier_tolerance if setting == "pretrain" else args.finetune_frontier_tolerance
        _place_on_frontier(records, setting, tol)
        _write(out, records, args, started)
    return _write(out, records, args, started)


def _start(args: CompareArguments):
    """Everything checked and prepared before the first run: ``(out, settings, names, user, pre, fine)``."""
    from ..strategies.registry import strategy_class

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = args.settings
    bad = sorted(set(settings) - {"pretrain", "finetune"})
    if bad:
        raise ValueError(f"unknown setting(s) {bad}; use pretrain and/or finetune")
    names = args.strategies
    for n in names:
        strategy_class(n)  # fails early, listing the available names
    user = parse_json_object(args.strategy_kwargs, "strategy_kwargs")
    # Old names are renamed in each layer, so that a layer's old name overrides an earlier layer's new one.
    pre = {
        **_renamed(_load_yaml(args.pretrain_config, "--pretrain_config"), "pretrain"),
        **_renamed(parse_json_object(args.pretrain_overrides, "pretrain_overrides"), "pretrain"),
    }
    fine_yaml = _renamed(_load_yaml(args.finetune_config, "--finetune_config"), "finetune")
    # the finetuning YAML's strategy settings belong to its own strategy, not to the others compared here
    yaml_strategy, yaml_kwargs = fine_yaml.pop("strategy", None), fine_yaml.pop("strategy_kwargs", None)
    fine_yaml.pop("learning_rate", None)
    for key in ("output_dir", "strategy"):
        pre.pop(key, None)
    fine = {**fine_yaml, **_renamed(parse_json_object(args.finetune_overrides, "finetune_overrides"), "finetune")}
    if args.quick:
        model = tiny_model_dir(out / "_tiny_bert")
        pre = {**pre, **QUICK_PRETRAIN, "model_name_or_path": model}
        fine = {**fine, **QUICK_FINETUNE, "model_name_or_path": model}
    if args.num_threads:
        pre["num_threads"] = args.num_threads
        fine["num_threads"] = args.num_threads
    if yaml_strategy and isinstance(yaml_kwargs, dict):
        user.setdefault(yaml_strategy, {})
        user[yaml_strategy] = {**yaml_kwargs, **user[yaml_strategy]}
    return out, settings, names, user, pre, fine


def _renamed(values: dict, setting: str) -> dict:
    """``values`` (settings of the ``setting`` runner) with old names replaced (hf_softmask.continual.renames)."""
    from .renames import renamed

    if setting == "pretrain":
        from .pretraining.config import ContinualPretrainingArguments as runner_args
    else:
        from .finetuning import ContinualFinetuningArguments as runner_args
    return renamed(values, {f.name for f in fields(runner_args)})


def _frontier_runs(
    args: CompareArguments, setting: str, base_args: dict, out: Path, records: list[dict]
) -> list[dict]:
    """The plain runs of ``setting`` over ``lr0 * factor``; the plain run already made (at ``lr0``) joins them."""
    plain = FRONTIER[setting][0]
    base = next(
        (r for r in records if r["setting"] == setting and r["strategy"] == plain and not r.get("frontier")), None
    )
    if base and base["learning_rate"]:
        lr0 = base["learning_rate"]
    elif setting == "pretrain":
        lr0 = base_args.get("learning_rate", 5e-5)
    else:
        lr0 = base_args.get("learning_rate", FINETUNE_WEIGHT_LR)
    extra = []
    for f in args.frontier_lr_factors:
        lr = lr0 * f
        if base and math.isclose(lr, lr0):
            base["frontier"] = True
            continue
        print(f"[compare] {setting} frontier: {plain} lr={lr:g}", flush=True)
        rec = _one(setting, plain, lr, base_args, {}, out / setting / f"{plain}_lr{lr:g}")
        rec["frontier"] = True
        extra.append(rec)
    return extra


def _place_on_frontier(records: list[dict], setting: str, tolerance: float) -> None:
    """``frontier_position`` of every non-frontier run of ``setting`` (one definition: continual.frontier)."""
    _, x, y = FRONTIER[setting]
    mine = [r for r in records if r["setting"] == setting]
    base = [(r[x], r[y]) for r in mine if r.get("frontier") and r.get(x) is not None and r.get(y) is not None]
    for r in mine:
        if r.get("frontier"):
            continue
        r["frontier_position"] = frontier_position((r.get(x), r.get(y)), base, tolerance) if base else "undecided"


def _fmt(v, spec=".4f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _markdown(records: list[dict], args: CompareArguments, started: str) -> str:
    lines = [f"Strategy comparison, started {started}; device: {_device()}; quick={args.quick}.", ""]
    pre = [r for r in records if r["setting"] == "pretrain"]
    if pre:
        lines += [
            "### Continual pre-training (held-out MLM/CLM loss, lower is better)",
            "",
            "| strategy | lr | final ppl | final mean loss | in-domain loss | forgetting | BWT | "
            "general-loss increase | vs ncl frontier | wall s | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in pre:
            pos = "frontier run" if r.get("frontier") else r.get("frontier_position", "–")
            if r.get("changes_effective_lr") and not r.get("frontier"):
                pos = f"**{pos}** (lowers eff. lr)"
            name = r["strategy"] + (" (error)" if r["error"] else "")
            lines.append(
                f"| {name} | {_fmt(r['learning_rate'], 'g')} | {_fmt(r.get('final_perplexity'), '.2f')} | "
                f"{_fmt(r.get('final_mean_loss'))} | "
                f"{_fmt(r.get('in_domain_loss'))} | {_fmt(r.get('forgetting'))} | {_fmt(r.get('bwt'))} | "
                f"{_fmt(r.get('general_loss_increase'))} | "
                f"{pos} | {_fmt(r['wall_seconds'], '.0f')} | {_fmt(r['peak_rss_mb'], '.0f')} |"
            )
        lines.append("")
    fin = [r for r in records if r["setting"] == "finetune"]
    if fin:
        lines += [
            "### Continual finetuning (task-incremental accuracy, higher is better)",
            "",
            "In-task error: 1 − accuracy on each task right after training it (the frontier's x axis; "
            "forgetting is its y axis).",
            "",
            "| strategy | lr | ACC | BWT | forgetting | in-task error | FWT | vs ft frontier | wall s | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in fin:
            pos = "frontier run" if r.get("frontier") else r.get("frontier_position", "–")
            if r.get("changes_effective_lr") and not r.get("frontier"):
                pos = f"**{pos}** (lowers eff. lr)"
            name = r["strategy"] + (" (error)" if r["error"] else "")
            lines.append(
                f"| {name} | {_fmt(r['learning_rate'], 'g')} | {_fmt(r.get('acc'))} | {_fmt(r.get('bwt'))} | "
                f"{_fmt(r.get('forgetting'))} | "
                f"{_fmt(r.get('in_task_error'))} | {_fmt(r.get('fwt'))} | {pos} | "
                f"{_fmt(r['wall_seconds'], '.0f')} | "
                f"{_fmt(r['peak_rss_mb'], '.0f')} |"
            )
        lines.append("")
    errors = [r for r in records if r["error"]]
    if errors:
        lines += ["Errors:", ""] + [f"- {r['setting']}/{r['strategy']}: {r['error']}" for r in errors] + [""]
    return "\n".join(lines)


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _write(out: Path, records: list[dict], args: CompareArguments, started: str) -> dict:
    payload = {
        "started": started,
        "device": _device(),
        "quick": args.quick,
        "frontier_tolerance": args.frontier_tolerance,
        "finetune_frontier_tolerance": args.finetune_frontier_tolerance,
        "arguments": {f.name: getattr(args, f.name) for f in fields(args)},
        "records": records,
    }
    atomic_write_json(out / "comparison.json", payload)
    atomic_write_text(out / "comparison.md", _markdown(records, args, started))
    return payload
