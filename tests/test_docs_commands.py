"""The docs stay true to the code: every command README.md and docs/*.md show parses with the parser of the script it
runs (no training), every module is on docs/architecture.md, and the root modules keep the layering it states."""

from __future__ import annotations

import ast
import re
import shlex
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"^[\w./-]+\.py$")
#: Scripts the docs name as the reader's own (``accelerate launch ... train.py``), not files of this repository.
READERS_OWN = {"train.py"}
ELIDED = {"...", "…"}


def _candidates(text: str):
    """``(line number, text)`` of what may hold a command: a code block's lines (continuations joined), and the
    inline code spans elsewhere."""
    lines = text.splitlines()
    in_code, i = False, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code:
            # a shell command goes on after a trailing backslash, and inside an open quote
            while (line.rstrip().endswith("\\") or _open_quote(line)) and i + 1 < len(lines):
                i += 1
                if line.rstrip().endswith("\\"):
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                else:
                    line = line + "\n" + lines[i]
            yield start, line
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield start, span
        i += 1


def _open_quote(line: str) -> bool:
    try:
        shlex.split(line, comments=True)
    except ValueError:
        return True
    return False


def doc_commands() -> list[tuple[str, int, list[str]]]:
    """Every ``[accelerate launch ...] python scripts/x.py ...`` shown: (page, line, tokens from the launcher or
    ``python`` on; an elided tail ``...`` dropped)."""
    found = []
    for page in PAGES:
        for number, text in _candidates(page.read_text()):
            if not re.search(r"(python3?|accelerate launch) [^`]*?\S+\.py\b", text):
                continue
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError as e:
                found.append((page.name, number, ["<unparsable>", str(e)]))
                continue
            start = next(i for i, t in enumerate(tokens) if t in ("python", "python3", "accelerate"))
            tokens = tokens[start:]
            if any(t in ELIDED for t in tokens):
                tokens = tokens[: next(i for i, t in enumerate(tokens) if t in ELIDED)]
            found.append((page.name, number, tokens))
    return found


COMMANDS = doc_commands()


def _check_launch(launch: list[str], script: str) -> None:
    """accelerate's own parser takes the launch flags; more than one process on a CPU needs --multi_gpu."""
    from accelerate.commands.launch import launch_command_parser

    ns = launch_command_parser().parse_args([*launch, script])
    if (ns.num_processes or 1) > 1 and ns.cpu:
        raise ValueError("accelerate launch --cpu starts ONE process whatever --num_processes says; use --multi_gpu")


def _parse(script: str, args: list[str]) -> None:
    name = Path(script).stem
    if name == "continual_pretrain":
        from hf_softmask.continual import parse_config

        parse_config(args)
    elif name == "continual_finetune":
        from hf_softmask.continual.finetuning import parse_finetuning_config

        parse_finetuning_config(args)
    elif name == "compare_strategies":
        from hf_softmask.continual.comparison import parse_compare_args

        parse_compare_args(args)


def test_the_docs_show_runner_commands():
    pages = {page for page, _, _ in COMMANDS}
    assert {"README.md", "pretraining.md", "finetuning.md"} <= pages, pages
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("page,line,tokens", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_doc_command_parses(page, line, tokens, monkeypatch):
    """Each command's script exists and its flags parse with that script's parser (argparse errors exit: caught)."""
    monkeypatch.chdir(ROOT)  # the docs' paths (configs/..., runs/...) are relative to the repository root
    where = f"docs {page}:{line}: {shlex.join(tokens)}"
    assert tokens[0] != "<unparsable>", f"{where}: {tokens[1]}"
    at = next((i for i, t in enumerate(tokens) if SCRIPT.match(t)), None)
    assert at is not None, f"{where}: no .py file in it"
    script, args = tokens[at], tokens[at + 1 :]
    if script in READERS_OWN:
        return
    assert (ROOT / script).is_file(), f"{where}: {script} is not in the repository"
    try:
        with warnings.catch_warnings():
            # a flag transformers calls deprecated (--gradient_checkpointing) is not what the docs should teach
            warnings.simplefilter("error", FutureWarning)
            if tokens[0] == "accelerate":
                _check_launch(tokens[2:at], script)
            _parse(script, args)
    except SystemExit as e:  # argparse reports an unknown or malformed flag by exiting
        pytest.fail(f"{where}: the parser refused it (exit {e.code}); see the captured stderr")
    except Exception as e:
        pytest.fail(f"{where}: {type(e).__name__}: {e}")


def _modules(package: Path) -> list[str]:
    return sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")


#: package -> how docs/architecture.md names its modules (``core/masking.py``; continual/'s in its own table)
PACKAGES = {
    "": "",
    "core": "core/",
    "baselines": "baselines/",
    "evaluation": "evaluation/",
    "utils": "utils/",
    "continual": "",
    "continual/finetuning": "finetuning/",
    "continual/pretraining": "pretraining/",
}


def test_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for name, prefix in PACKAGES.items():
        missing = [m for m in _modules(ROOT / "hf_softmask" / name) if f"`{prefix}{m}.py`" not in page]
        assert not missing, f"docs/architecture.md does not name {name or 'hf_softmask'}/{missing}"


#: Which layers a layer may import (docs/architecture.md): lower layers never import higher ones.
MAY_IMPORT = {
    "utils": set(),
    "evaluation": {"utils"},
    "core": {"utils", "data"},
    "data": {"utils", "core"},
    "task_heads": {"utils"},
    "baselines": {"utils", "core", "data"},
    "tss": {"utils", "core"},
    "strategies": {"utils", "core", "baselines", "tss", "task_heads", "data"},
}


def _layer(parts: list[str]) -> str:
    return parts[0] if parts else "__init__"


def test_layers_import_only_lower_layers():
    """core, baselines, evaluation and utils never import the strategies or the runners; strategies never import the
    runners; only the package's __init__ and the command (command_line.py, __main__.py) sit above continual/."""
    offenders = []
    for path in (ROOT / "hf_softmask").rglob("*.py"):
        parts = list(path.relative_to(ROOT / "hf_softmask").with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        package = parts[:-1]
        source = _layer(parts[:-1] if is_init else parts)
        if source not in MAY_IMPORT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                target = _layer(base)
                if target != source and target not in MAY_IMPORT[source]:
                    offenders.append(f"{'/'.join(parts)}.py ({source}) imports {'.'.join(base)} ({target})")
    assert not offenders, offenders
