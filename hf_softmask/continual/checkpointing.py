"""Run state on disk: which stages are done, staged domain directories, and Trainer checkpoints to resume from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..io import atomic_replace_dir, atomic_write_json

__all__ = ["RunState", "stage_dir", "domain_dir_name", "last_trainer_checkpoint", "RunMismatchError"]

STATE_FILE = "state.json"


class RunMismatchError(RuntimeError):
    """``output_dir`` holds a run with different settings than the ones given now."""


def domain_dir_name(index: int, name: str) -> str:
    """``<k>_<domain>`` with k counted from 1 (``0_base`` is the starting point)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
    return f"{index}_{safe}"


class RunState:
    """``output_dir/state.json``: the settings fingerprint, finished stages and their evaluation rows.

    Only the main process writes it, atomically, after the stage's directory is in place, so a crash leaves
    either the old state or the new one and every stage the state lists is complete on disk.
    """

    def __init__(self, output_dir: str | os.PathLike, fingerprint: dict):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / STATE_FILE
        self.fingerprint = fingerprint
        self.data = {"fingerprint": fingerprint, "base": None, "domains": []}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") != fingerprint:
                diff = {k: (saved.get("fingerprint", {}).get(k), v) for k, v in fingerprint.items()
                        if saved.get("fingerprint", {}).get(k) != v}
                raise RunMismatchError(
                    f"{self.output_dir} holds a run with other settings (saved vs now: {diff}); "
                    "use a new --output_dir, or delete the old one to start over"
                )
            self.data = saved

    @property
    def base(self) -> dict | None:
        return self.data["base"]

    @property
    def done(self) -> list[dict]:
        return self.data["domains"]

    def set_base(self, record: dict) -> None:
        self.data["base"] = record

    def add_domain(self, record: dict) -> None:
        self.data["domains"].append(record)

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def last_dir(self) -> Path | None:
        """Directory of the last finished stage (domain, else base), None before anything finished."""
        if self.done:
            return self.output_dir / self.done[-1]["dir"]
        if self.base:
            return self.output_dir / self.base["dir"]
        return None


def stage_dir(output_dir: str | os.PathLike, name: str) -> Path:
    """A fresh staging directory for stage ``name`` (a leftover of a crashed attempt is removed)."""
    staging = Path(output_dir) / f".staging_{name}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish_dir(staging: Path, final: Path) -> None:
    """Rename a fully written staging directory into place."""
    atomic_replace_dir(staging, final)


def last_trainer_checkpoint(directory: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` in ``directory`` (one holding trainer_state.json), else None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    ckpts = []
    for p in directory.glob("checkpoint-*"):
        step = p.name.split("-")[-1]
        if step.isdigit() and (p / "trainer_state.json").is_file():
            ckpts.append((int(step), p))
    return str(max(ckpts)[1]) if ckpts else None
