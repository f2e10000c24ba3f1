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


def test_moved_modules_import_from_their_old_paths():
    """Modules grouped into layers (core/, baselines/, evaluation/, utils/, continual/pretraining/) still import
    from the paths users wrote before, as the same module object, each warning once (FutureWarning)."""
    import subprocess
    import sys

    from hf_softmask import _MOVED_MODULES

    code = (
        "import importlib, warnings, json\n"
        "warnings.simplefilter('always')\n"
        f"moves = {_MOVED_MODULES!r}\n"
        "out = {}\n"
        "for old, new in moves.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        a = importlib.import_module('hf_softmask.' + old)\n"
        "    b = importlib.import_module('hf_softmask.' + new)\n"
        "    out[old] = [a is b, [str(w.message) for w in caught if w.category is FutureWarning]]\n"
        "from hf_softmask.masking import SoftMaskConfig\n"
        "from hf_softmask.core.masking import SoftMaskConfig as New\n"
        "out['_from_import'] = SoftMaskConfig is New\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("_from_import") is True
    assert set(out) == set(_MOVED_MODULES) and len(out) > 30
    for old, (same, messages) in out.items():
        assert same, old
        assert messages == [
            f"hf_softmask.{old} is deprecated and will be removed in the next release: use "
            f"hf_softmask.{_MOVED_MODULES[old]}"
        ], old
