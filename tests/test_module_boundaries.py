"""The shipped package's modules talk to each other through public names only."""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest

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
    """``is_dtensor`` / ``local_tensor`` live in hf_softmask.core.dtensor; no other module defines its own."""
    defs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in {"is_dtensor", "local", "local_tensor"}:
                defs.append(f"{path.relative_to(PACKAGE.parent)}:{node.name}")
    assert defs == ["hf_softmask/core/dtensor.py:is_dtensor", "hf_softmask/core/dtensor.py:local_tensor"]


@pytest.mark.parametrize(
    "module, old, new",
    [
        ("hf_softmask", "LoRAConfig", "LoRABaselineConfig"),
        ("hf_softmask.strategies.lora", "LoRAConfig", "LoRABaselineConfig"),
        ("hf_softmask.utils.io", "PushToHubMixin", "HubUploadMixin"),
    ],
)
def test_renamed_public_names_still_work_and_warn_once(module, old, new, monkeypatch):
    from hf_softmask.utils import deprecation

    monkeypatch.setattr(deprecation, "_warned", set())
    mod = importlib.import_module(module)
    with pytest.warns(FutureWarning, match=rf"{module}\.{old} is deprecated .* use {module}\.{new}"):
        value = getattr(mod, old)
    assert value is getattr(mod, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(mod, old) is value  # the second use is silent
    assert old not in getattr(mod, "__all__")


def test_an_unknown_name_is_still_an_attribute_error():
    import hf_softmask.strategies.lora
    import hf_softmask.utils.io

    for mod in (hf_softmask.utils.io, hf_softmask.strategies.lora):
        with pytest.raises(AttributeError, match="no attribute 'Nope'"):
            mod.Nope  # noqa: B018


def test_hub_upload_is_written_once():
    """Every upload goes through hf_softmask.utils.io.upload_folder_to_hub (HfApi's create_repo + upload_folder)."""
    callers = sorted(
        str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if ".upload_folder(" in p.read_text()
    )
    assert callers == ["hf_softmask/utils/io.py"]


def test_the_shipped_package_names_no_pytest_node_ids():
    """Which tests prove what lives beside the tests (tests/compat_evidence.py), not in the package."""
    node = re.compile(r"tests/test_\w+\.py::\w+")
    found = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if node.search(p.read_text()))
    assert found == []
