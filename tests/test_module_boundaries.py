"""The shipped package's modules talk to each other through public names only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_softmask"


def _private_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            internal = node.level > 0 or (node.module or "").split(".")[0] == "hf_softmask"
            for alias in node.names if internal else ():
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {alias.name}")
    return found


def test_no_module_imports_another_modules_private_name():
    assert _private_imports() == []


def test_dtensor_helpers_are_written_once():
    """``is_dtensor`` / ``local_tensor`` live in hf_softmask.dtensor; no other module defines its own."""
    defs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in {"is_dtensor", "local", "local_tensor"}:
                defs.append(f"{path.relative_to(PACKAGE.parent)}:{node.name}")
    assert defs == ["hf_softmask/dtensor.py:is_dtensor", "hf_softmask/dtensor.py:local_tensor"]
