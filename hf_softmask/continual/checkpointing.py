"""Run state on disk: which stages are done, staged domain directories, and Trainer checkpoints to resume from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..utils.io import atomic_replace_dir, atomic_write_json
from .cli import UserError

__all__ = [
    "RunState",
    "stage_dir",
    "domain_dir_name",
    "last_trainer_checkpoint",
    "RunMismatchError",
    "DamagedRunError",
]

STATE_FILE = "state.json"
OVERWRITE_HINT = "use a new --output_dir, or pass --overwrite_output_dir to delete it and start over"


class RunMismatchError(UserError, RuntimeError):
    """``output_dir`` holds a run with different settings, another kind of run, or files of something else."""


class DamagedRunError(UserError, RuntimeError):
    """A file of a run directory cannot be read (truncated, corrupted)."""


def _normalised(obj):
    """The JSON form of ``obj`` (what a saved fingerprint is compared against)."""
    return json.loads(json.dumps(obj, default=str))


def _clear(directory: Path) -> None:
    """Delete the entries of ``directory`` (--overwrite_output_dir); never a directory holding the working one."""
    resolved = directory.resolve()
    if (
        resolved == Path.home().resolve()
        or resolved in Path.cwd().resolve().parents
        or resolved == Path.cwd().resolve()
    ):
        raise RunMismatchError(
            f"--overwrite_output_dir refuses to empty {directory}: it holds the working or home "
            "directory; give a dedicated --output_dir"
        )
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def domain_dir_name(index: int, name: str) -> str:
    """``<k>_<domain>`` with k counted from 1 (``0_base`` is the starting point)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
    return f"{index}_{safe}"


class RunState:
    """``output_dir/state.json``: the settings fingerprint (run kind included), finished stages and their rows.

    It is the first file a run writes (:meth:`start`) and marks the directory as that run's: a directory with other
    settings, another kind of run, or files but no state.json is refused unless ``overwrite`` (then emptied). Only
    the main process writes it, atomically, after the stage's directory is in place, so a crash leaves either the
    old state or the new one and every stage the state lists is complete on disk.
    """

    def __init__(self, output_dir: str | os.PathLike, fingerprint: dict, overwrite: bool = False, added_settings=None):
        """``added_settings``: settings added since runs were first saved, with the value that reproduces them; a
        saved fingerprint without one of these keys is compared as holding that value. A saved key that
        ``fingerprint`` no longer has (a setting since found not to change results) is not compared."""
        self.output_dir = Path(output_dir)
        self.added_settings = _normalised(dict(added_settings or {}))
        self.path = self.output_dir / STATE_FILE
        self.fingerprint = _normalised(fingerprint)
        self.data = {"fingerprint": self.fingerprint, "base": None, "domains": []}
        self._damage = None
        problem = self._problem()
        if self._damage is not None and not overwrite:
            raise self._damage
        if problem and not overwrite:
            raise RunMismatchError(f"{problem}; {OVERWRITE_HINT}")
        self._needs_clear = bool(problem)
        if not problem and self.path.is_file():
            self.data = self._read()

    def _read(self) -> dict:
        try:
            saved = json.loads(self.path.read_text())
            if not isinstance(saved, dict) or not {"fingerprint", "base", "domains"} <= set(saved):
                raise ValueError("not a run state (keys fingerprint, base, domains missing)")
            return saved
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedRunError(
                f"{self.path} is damaged ({e}); restore it from a copy, or {OVERWRITE_HINT}"
            ) from None

    def _problem(self) -> str | None:
        """Why ``output_dir`` is not this run's (None when it is, or is empty/absent)."""
        if self.path.is_file():
            try:
                saved = self._read().get("fingerprint", {})
                if saved:
                    saved = {**{k: v for k, v in self.added_settings.items() if k in self.fingerprint}, **saved}
                    saved = {k: v for k, v in saved.items() if k in self.fingerprint}
            except DamagedRunError as e:
                self._damage = e
                return str(e)
            if saved.get("runner", self.fingerprint.get("runner")) != self.fingerprint.get("runner"):
                return (
                    f"{self.output_dir} holds a {saved.get('runner')} run, not a {self.fingerprint.get('runner')} run"
                )
            if saved != self.fingerprint:
                diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
                return f"{self.output_dir} holds a run with other settings (saved vs now: {diff})"
            return None
        if self.output_dir.is_dir() and any(self.output_dir.iterdir()):
            names = sorted(p.name for p in self.output_dir.iterdir())[:5]
            return (
                f"{self.output_dir} holds files ({', '.join(names)}, ...) but no {STATE_FILE}: "
                "not a run of this runner"
            )
        return None

    def check_writable(self) -> None:
        """Refuse an output_dir the run cannot write (read-only, no permission), before any work is done."""
        import tempfile

        target = (
            self.output_dir
            if self.output_dir.is_dir()
            else next((p for p in self.output_dir.parents if p.is_dir()), Path("."))
        )
        try:
            fd, tmp = tempfile.mkstemp(prefix=".write_test.", dir=target)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise PermissionError(
                e.errno, f"cannot write to --output_dir {self.output_dir} ({e.strerror}); give a writable directory"
            ) from None

    def start(self) -> None:
        """Empty a directory of another run (``overwrite``), create it and write state.json before any other file
        (main process, once every setting has been checked)."""
        if self._needs_clear:
            _clear(self.output_dir)
            self._needs_clear = False
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file():
            self.save()

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
        if self.base and self.base.get("dir"):
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


def publish_once(staging: Path, final: Path) -> bool:
    """Rename a fully written staging directory to ``final`` unless another process published it first (a cache
    entry of the same content): then ours is discarded. A published entry is never moved aside, so a process
    reading it is never left without its files. Returns whether ours was published."""
    import shutil

    try:
        os.rename(staging, final)  # refused when final exists and is not empty
        return True
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False


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


# -- integrity of what a resume reads --------------------------------------------------------------------------------
def file_digests(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file directly in ``directory`` (recorded in state.json when a stage is published)."""
    import hashlib

    out = {}
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[path.name] = h.hexdigest()
    return out


def verify_stage(directory: Path, digests: dict | None) -> None:
    """Check a finished stage against the checksums recorded when it was saved; DamagedRunError names the file."""
    if not directory.is_dir():
        raise DamagedRunError(
            f"{directory} is missing but {STATE_FILE} lists it as finished; restore it, or {OVERWRITE_HINT}"
        )
    if not digests:
        verify_readable(directory, "restore it, or " + OVERWRITE_HINT)
        return
    now = file_digests(directory)
    for name, digest in digests.items():
        if name not in now:
            raise DamagedRunError(
                f"{directory / name} is missing (it was saved with the stage); restore it, or {OVERWRITE_HINT}"
            )
        if now[name] != digest:
            raise DamagedRunError(
                f"{directory / name} is damaged (its checksum differs from the one recorded when "
                f"it was saved); restore it, or {OVERWRITE_HINT}"
            )


def verify_readable(directory: Path, fix: str) -> None:
    """Structural check of the files a resume reads (JSON parses, safetensors headers cover the file, torch zip
    archives pass their CRC check); DamagedRunError names the first bad file and ``fix``."""
    import zipfile

    for path in sorted(Path(directory).iterdir()):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    f.keys()
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} fails its CRC check")
        except Exception as e:  # any reader error means the same thing here: this file cannot be used
            raise DamagedRunError(f"{path} is damaged ({type(e).__name__}: {e}); {fix}") from None
