"""Command-line parsing shared by both runners: YAML defaults, exact flags, honest help, refused Trainer flags.

Both runners take ``TrainingArguments`` subclasses, so every Trainer flag exists; this module refuses the ones
a runner cannot honour (with the reason and the fix) instead of letting them be ignored.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from ..utils.package_data import HELP_DIR, config_file
from .renames import applies, renamed, renamed_flags

__all__ = [
    "UserError",
    "SettingError",
    "user_errors",
    "one_line",
    "HelpFormatter",
    "make_parser",
    "parse_args",
    "build_parser",
    "parse_with_yaml",
    "comma_separated_fields",
    "split_commas",
    "parse_float_list",
    "parse_int_list",
    "parse_str_list",
    "refuse_unsupported_trainer_flags",
    "refuse_fsdp1_flags",
    "help_text",
    "check_process_group",
    "use_cpu_without_cuda",
    "require_positive",
    "require_steps",
    "require_choice",
    "register_architectures",
    "RESUME_HINT",
]

#: What --resume_from_checkpoint would mean here, and why the runners do it by themselves.
RESUME_HINT = (
    "the runner resumes by itself: rerun the same command with the same --output_dir; finished stages are "
    "skipped and an unfinished one continues from its newest checkpoint"
)


# -- user errors ----------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A mistake in what the user asked for (a flag, a value, a YAML file, a path, an output_dir holding another
    run): ``hf-softmask`` prints it as one line and exits 2, without a traceback. ``hint``: an optional second line.
    """

    hint: str | None = None


class SettingError(UserError, ValueError):
    """A flag, a value or a YAML file that cannot be used (still a ValueError for Python callers)."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory named by a setting does not exist (still a FileNotFoundError)."""


class NoPermissionError(UserError, PermissionError):
    """A path named by a setting cannot be written or read (still a PermissionError)."""


#: (what is raised, the user error it becomes) while the user's settings are checked (:func:`user_errors`).
_AS_USER_ERROR = (
    (PermissionError, NoPermissionError),
    (FileNotFoundError, MissingPathError),
    (NotADirectoryError, MissingPathError),
    (ValueError, SettingError),
)


@contextmanager
def user_errors():
    """Around parsing, validation and a runner's start-up checks (nothing trained yet): a ValueError,
    FileNotFoundError, PermissionError or missing optional dependency raised inside is the user's mistake and
    leaves as a :class:`UserError` (same message and traceback, still an instance of its old class). Errors of
    the later phases (training) are not wrapped: they keep their type and traceback."""
    from ..utils.extras import MissingExtraError

    try:
        yield
    except UserError:
        raise
    except MissingExtraError as e:
        raise _as(_missing_extra_class(), e) from e.__cause__
    except Exception as e:
        cls = next((cls for base, cls in _AS_USER_ERROR if isinstance(e, base)), None)
        if cls is None:
            raise
        raise _as(cls, e) from e.__cause__


@functools.cache
def _missing_extra_class():
    from ..utils.extras import MissingExtraError

    return type("MissingExtraError", (UserError, MissingExtraError), {"__module__": __name__})


def _as(cls, e: BaseException) -> BaseException:
    new = cls(str(e))
    new.hint = getattr(e, "hint", None)
    return new.with_traceback(e.__traceback__)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (YAML and nested errors carry newlines and indentation)."""
    return " ".join(str(error).split()) or type(error).__name__


@functools.cache
def _parser_class():
    """``HfArgumentParser`` whose errors raise :class:`SettingError` instead of printing the whole usage and
    exiting (imported lazily: ``--help`` is answered without transformers)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):
            # argparse names a flag by all its spellings ("--learning_rate/--learning-rate"): keep the first.
            message = re.sub(r"(argument --\w+)(/--[\w-]+)+", r"\1", message)
            error = SettingError(message)
            error.hint = f"{self.prog} --help lists the flags"
            raise error

    return Parser


def make_parser(dataclass_types, prog: str):
    """The argument parser of ``dataclass_types``: its errors raise :class:`SettingError`; the stored help format."""
    return _parser_class()(dataclass_types, prog=prog, allow_abbrev=False, formatter_class=HelpFormatter)


def parse_args(parser, argv: list[str]) -> tuple:
    """``parser``'s dataclasses from ``argv``. An unknown flag (the nearest one as the hint), a bad value and a
    dataclass's own check that fails raise :class:`SettingError`."""
    argv = split_commas(argv, comma_separated_fields(parser.dataclass_types))
    with user_errors():
        _, unknown = parser.parse_known_args(argv)
        if unknown:
            error = SettingError(f"unrecognized arguments: {' '.join(unknown)}")
            flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
            close = difflib.get_close_matches(unknown[0].partition("=")[0], flags, n=1)
            error.hint = f"did you mean {close[0]}?" if close else f"{parser.prog} --help lists the flags"
            raise error
        out = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return tuple(x for x in out if not isinstance(x, argparse.Namespace))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Fixed width (the help text is stored and compared by a test); a default is shown once and only when true.

    ``--no_<flag>`` switches (store_false) would be printed with the default of ``<flag>``, which reads as the
    opposite of the truth; help strings that already state their default are left alone.
    """

    def __init__(self, prog, **kw):
        kw["width"] = 110
        kw["max_help_position"] = 40
        super().__init__(prog, **kw)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or any(s.startswith("--no_") for s in action.option_strings):
            return text
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def build_parser(dataclass_types, prog: str):
    parser = make_parser(dataclass_types, prog)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of field: value pairs, or a shipped config's name (default, smollm2_bbc, ...); "
        "flags given after it override it.",
    )
    for action in parser._actions:
        flag = next((s for s in action.option_strings if s.startswith("--no_")), None)
        if flag is not None:
            action.help = f"Turn off --{flag[5:]}."
    return parser


def help_text(dataclass_types, prog: str) -> str:
    return build_parser(dataclass_types, prog).format_help()


def comma_separated_fields(dataclass_types) -> set[str]:
    """The list fields of ``dataclass_types`` that also read ``a,b`` as two items, on the command line and in YAML:
    those a class names in its ``comma_separated_fields`` (items that never hold a comma: numbers, seeds, names)."""
    return {name for cls in dataclass_types for name in getattr(cls, "comma_separated_fields", ())}


def split_commas(argv: list[str], names: set[str]) -> list[str]:
    """``--name a,b c`` as ``--name a b c`` (and ``--name=a,b``) for the fields in ``names``."""
    out, inside = [], False
    for arg in argv:
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            inside = flag[2:] in names
            if inside and eq:
                out += [flag, *[v for v in value.split(",") if v]]
                inside = False
                continue
            out.append(arg)
        else:
            out += [v for v in arg.split(",") if v] if inside else [arg]
    return out


def parse_float_list(value, name: str | None = None) -> list[float]:
    """Numbers from a list, or from a comma-separated string; ``name``: the flag an error names."""
    return _parse_list(value, float, name, "numbers")


def parse_int_list(value, name: str | None = None) -> list[int]:
    """Integers from a list, or from a comma-separated string; ``name``: the flag an error names."""
    return _parse_list(value, int, name, "integers")


def _parse_list(value, kind, name, what):
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        out = []
        for v in (v for v in items if str(v).strip()):
            if isinstance(v, bool) or (kind is int and isinstance(v, float) and not v.is_integer()):
                raise ValueError(v)  # True is not a seed, and 1.5 is not 1
            out.append(kind(v.strip() if isinstance(v, str) else v))
        return out
    except (TypeError, ValueError):
        flag = f"--{name} " if name else ""
        raise ValueError(f"{flag}expected a list of {what}, got {value!r}") from None


def parse_str_list(value) -> list[str]:
    """Names from a list, or from a comma-separated string (blank items dropped)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def parse_with_yaml(dataclass_types, argv: list[str] | None, prog: str, yaml_hook=None):
    """Parse ``argv`` into the dataclasses; ``--config file.yaml`` supplies defaults that flags override.

    Old names (:mod:`.renames`) are read in YAML and as flags. Unknown YAML keys, unknown or abbreviated flags, bad
    values and the dataclasses' own checks raise :class:`SettingError` naming them. ``yaml_hook(data)`` may rewrite
    the YAML mapping (e.g. JSON-encode a nested value) before it becomes the parser's defaults.
    """
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(dataclass_types, prog)
    names = {f.name for cls in dataclass_types for f in fields(cls)}
    commas = comma_separated_fields(dataclass_types)
    with user_errors():
        argv = split_commas(renamed_flags(argv, names), commas)
        known, _ = parser.parse_known_args(argv)
        if known.config:
            path = config_file(known.config)  # a file, or a shipped config by name
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"--config {path}: not valid YAML ({e})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping of field: value at the top level")
            unknown = sorted(k for k in data if k not in names and not applies(k, names))
            if unknown:
                raise ValueError(f"{path}: unknown field(s) {unknown}; run with --help for the list of fields")
            # Renamed here, not left to __post_init__, so that the new flag on the command line overrides the YAML.
            data = renamed(data, names)
            for name in commas & set(data):  # argparse would convert a string default as ONE item
                if isinstance(data[name], str):
                    data[name] = parse_str_list(data[name])
            if yaml_hook is not None:
                data = yaml_hook(data)
            # argparse converts only string defaults; YAML values arrive already typed.
            parser.set_defaults(**data)
    return parse_args(parser, argv)


# -- validation ---------------------------------------------------------------------------------------------------
def require_positive(name: str, value, *, allow_zero: bool = False, allow_none: bool = False) -> None:
    """A finite number > 0 (>= 0 with ``allow_zero``), else ValueError naming the flag."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"--{name} must be a finite number {need}, got {value!r}")


def require_steps(max_steps: int, num_train_epochs: float, per: str) -> None:
    """``max_steps`` > 0, or -1 with ``num_train_epochs`` > 0 (both counted ``per`` domain or task)."""
    if max_steps == 0 or (max_steps < 0 and max_steps != -1):
        raise ValueError(
            f"--max_steps (per {per}) must be > 0, or -1 to train --num_train_epochs per {per}; got {max_steps}"
        )
    if max_steps == -1:
        require_positive("num_train_epochs", num_train_epochs)


def require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{name} must be one of {list(choices)}, got {value!r}")


def _is_set(value) -> bool:
    return value not in (None, False, "", [], {}, "no")


def refuse_unsupported_trainer_flags(args, runner: str) -> None:
    """Refuse Trainer flags the runner cannot honour; each message names the flag, the reason and the fix."""
    if _is_set(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ValueError(
            f"--deepspeed: the {runner} runner does not support DeepSpeed (its optimizer steps flat fp32 "
            "partitions the soft masks cannot follow); use FSDP2 for sharded training "
            "(accelerate launch --config_file <the shipped configs/accelerate/fsdp.yaml: "
            "python -c 'from hf_softmask.utils.package_data import config_file; "
            'print(config_file("accelerate/fsdp"))\'>, '
            "or --fsdp), or DDP"
        )
    if _is_set(args.resume_from_checkpoint):
        raise ValueError(f"--resume_from_checkpoint: {RESUME_HINT}")
    evaluation = {
        "eval_strategy": args.eval_strategy,
        "load_best_model_at_end": args.load_best_model_at_end,
        "eval_on_start": args.eval_on_start,
        "do_eval": args.do_eval,
        "do_predict": args.do_predict,
        "metric_for_best_model": args.metric_for_best_model,
    }
    for name, value in evaluation.items():
        if _is_set(getattr(value, "value", value)):
            raise ValueError(
                f"--{name}: the {runner} runner evaluates every stage itself after training it "
                "(results.json); the Trainer has no evaluation set here. Drop the flag"
            )
    if getattr(args.save_strategy, "value", args.save_strategy) == "best":
        raise ValueError(
            "--save_strategy best needs Trainer evaluation, which the runner does not run; use steps or no"
        )
    if str(getattr(args.hub_strategy, "value", args.hub_strategy)) not in ("every_save", "end"):
        raise ValueError(
            f"--hub_strategy {args.hub_strategy}: the {runner} runner pushes each finished stage itself, "
            "not Trainer checkpoints; drop the flag"
        )
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (the repo id prefix, e.g. 'me/minilm-das')")


def refuse_fsdp1_flags(args, runner: str) -> None:
    """Refuse FSDP1 (``--fsdp`` with fsdp_config version 1, ``accelerate launch --use_fsdp`` without version 2).

    After ``TrainingArguments.__post_init__``: the version is the one transformers hands accelerate's plugin."""
    from ..core.compatibility import FSDP1_WHAT, USE_FSDP2, fsdp_version

    if fsdp_version(args) == 1:
        raise ValueError(
            f"FSDP1 (--fsdp with fsdp_config version 1, or an accelerate config / ACCELERATE_USE_FSDP without "
            f"fsdp_version 2): {FSDP1_WHAT}, which the {runner} runner's masks, importance and sharded "
            f"evaluation and saving do not follow; {USE_FSDP2}"
        )


def use_cpu_without_cuda(args) -> None:
    """No CUDA: run on the CPU (``use_cpu``), so bf16 autocast is allowed and ``accelerate launch`` / torchrun
    processes join one gloo process group instead of each training alone."""
    import torch

    if not torch.cuda.is_available():
        args.use_cpu = True


def check_process_group(runner: str) -> None:
    """Refuse a multi-process launch whose processes did not join one process group (each would train alone).

    ``accelerate launch --num_processes 2`` on a machine without CUDA and without ACCELERATE_USE_CPU starts two
    processes that each see world size 1: two independent copies writing into one directory.
    """
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    joined = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    mpi = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    # accelerate's simple launcher (--cpu, or no --multi_gpu without GPUs) sets MASTER_ADDR when asked for more
    # than one process, then starts ONE, which would train alone while the user believes it has company.
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        if joined == 1 and not mpi:
            raise RuntimeError(
                f"the {runner} runner was started by accelerate's single-process launcher although "
                "--num_processes > 1 was asked for (accelerate launch with --cpu, or without --multi_gpu on a "
                "machine without GPUs, starts ONE process). For N gloo processes on a CPU run "
                "'accelerate launch --multi_gpu --num_processes N ...'; for one process drop --num_processes "
                "(or unset MASTER_ADDR)"
            )
    if launched > 1 and joined != launched:
        raise RuntimeError(
            f"the {runner} runner was launched as {launched} processes (WORLD_SIZE={launched}) but they "
            f"did not join one process group (world size {joined}); each would train its own copy into "
            "the same directory. On a CPU set ACCELERATE_USE_CPU=true (or pass --use_cpu true)"
        )


def register_architectures(specs: str | None) -> None:
    """``--register_architecture module:function[,module:function]``: import and call each (it registers a spec)."""
    import importlib

    for spec in [s.strip() for s in (specs or "").split(",") if s.strip()]:
        module, _, func = spec.partition(":")
        if not module or not func:
            raise ValueError(f"--register_architecture {spec!r}: expected module:function, e.g. my_pkg.arch:register")
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"--register_architecture {spec!r}: cannot load it ({e}); the module must be importable "
                "(on PYTHONPATH) and define the function"
            ) from None
        fn()


# -- stored --help text -------------------------------------------------------------------------------------------
def runner_parsers() -> dict:
    """``{script name: (dataclass types, prog)}`` of both runners (imports them: slow, so only for writing)."""
    from .finetuning import PROG as FINETUNE_PROG
    from .finetuning import ContinualFinetuningArguments
    from .pretraining.config import PROG as PRETRAIN_PROG
    from .pretraining.config import ContinualPretrainingArguments

    return {
        "continual_pretrain": ((ContinualPretrainingArguments,), PRETRAIN_PROG),
        "continual_finetune": ((ContinualFinetuningArguments,), FINETUNE_PROG),
    }


def help_texts() -> dict[str, str]:
    """``{script name: --help text}`` of the commands whose help is stored (both runners and the comparison)."""
    from .comparison import compare_parser

    texts = {name: help_text(types, prog) for name, (types, prog) in runner_parsers().items()}
    texts["compare_strategies"] = compare_parser().format_help()
    return texts


def write_help_files() -> list[Path]:
    """Regenerate ``help/<script>.txt``: ``python -m hf_softmask.continual.cli``."""
    paths = []
    for name, text in help_texts().items():
        path = HELP_DIR / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_help_files():
        print(f"wrote {p}")
