"""A misspelled importance path is named in a FileNotFoundError, not turned into a Hub validation or connection error.

Before: ``UnitImportance.from_pretrained`` sent every path that is not a directory to ``hf_hub_download``, so
``"importnace"`` and ``"no_such_dir/importance"`` gave ``LocalEntryNotFoundError`` ("check your connection"), and
``"./x"`` a repo-id validation error, none naming the path; ``SoftMaskCallback`` went through it too.
"""

from __future__ import annotations

import re

import pytest

from hf_softmask import SoftMaskCallback, UnitImportance, UnitLayout
from tests.testing_utils import tiny_llama

LOADERS = {"UnitImportance.from_pretrained": UnitImportance.from_pretrained, "SoftMaskCallback": SoftMaskCallback}

#: (path, what the error says about it). The tests run with HF_HUB_OFFLINE=1 (tests/conftest.py).
MISSING = [
    ("importnace", "no such directory"),  # no owner/name: a local path only
    ("./nowhere/importance", "no such directory"),
    ("~/no_such_dir_hf_softmask/importance", "no such directory"),
    ("no..dir/imp", "no such directory"),  # not a valid repo id
    ("no_such_dir/importance", "neither a local directory nor available offline"),  # owner/name: maybe the Hub
]


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("path, message", MISSING)
def test_missing_path_is_named(loader, path, message):
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(path)}: {message}"):
        LOADERS[loader](path)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_directory_without_importance_is_named(loader, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(tmp_path))}: holds no saved UnitImportance"):
        LOADERS[loader](tmp_path)


def test_existing_directory_still_loads(tmp_path, monkeypatch):
    imp = UnitImportance.zeros_like_layout(UnitLayout.from_model(tiny_llama()))
    imp.heads[1, 2] = 1.0
    imp.save_pretrained(tmp_path / "imp")
    monkeypatch.chdir(tmp_path)
    for path in ("imp", "./imp", tmp_path / "imp"):  # "imp" is a valid repo id too: the directory wins
        loaded = UnitImportance.from_pretrained(path)
        assert loaded.heads[1, 2] == 1.0 and loaded.meta == imp.meta
    assert SoftMaskCallback("imp").importance.heads[1, 2] == 1.0
