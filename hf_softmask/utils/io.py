"""Atomic file writes (a crash leaves either the old file or the new one, never half of one), and Hub uploads."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .deprecation import renamed_attributes

__all__ = [
    "HubUploadMixin",
    "push_saved_to_hub",
    "upload_folder_to_hub",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "atomic_replace_dir",
]

# The old name ``PushToHubMixin`` is transformers' own class's; it still works, with a FutureWarning.
__getattr__ = renamed_attributes(__name__, {"PushToHubMixin": "HubUploadMixin"})


def _tmp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def _commit(tmp: str, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    # mkstemp creates 0600 files; give the result the permissions an ordinary write would (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``: readers see the old file
    or the whole new one, never half of it (same directory, so the rename stays on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        write(tmp)
        _commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _json_safe(obj):
    """``obj`` with every non-finite float as None: JSON has no NaN or Infinity, and strict readers refuse them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as strict JSON (non-finite numbers become null), atomically."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def atomic_replace_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written ``staging`` directory to ``final`` (replacing an older one)."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            import shutil

            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(staging, final)
        import shutil

        shutil.rmtree(old)
    else:
        os.replace(staging, final)


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token=None,
    revision=None,
) -> str:
    """Upload ``folder``'s files to the Hub repo ``repo_id``, creating the repo if needed; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
    )
    return str(info)


def push_saved_to_hub(
    save_pretrained, repo_id: str, *, commit_message: str, private: bool | None = None, token=None, revision=None
) -> str:
    """Write an object's files with ``save_pretrained(tmpdir)`` and upload them to a Hub repo; returns the URL."""
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(tmp)
        return upload_folder_to_hub(
            tmp, repo_id, commit_message=commit_message, private=private, token=token, revision=revision
        )


class HubUploadMixin:
    """``push_to_hub`` for a class with ``save_pretrained``: its files uploaded like any HF object's."""

    hub_commit_message = "Upload"

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token=None,
        revision=None,
    ) -> str:
        """Write ``save_pretrained``'s files and upload them to the Hub repo ``repo_id``; returns the commit URL."""
        return push_saved_to_hub(
            self.save_pretrained,
            repo_id,
            commit_message=commit_message or self.hub_commit_message,
            private=private,
            token=token,
            revision=revision,
        )


def generated_page_main(page: Path, render, script: str, description: str | None, argv: list[str] | None) -> int:
    """The CLI of a script that generates a docs page: write it, or with ``--check`` exit 1 when it is stale."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help=f"Exit 1 if {page.name} is stale.")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not page.is_file() or page.read_text() != text:
            print(f"{page} is stale: run python {script}", file=sys.stderr)
            return 1
        return 0
    page.write_text(text)
    print(f"wrote {page}")
    return 0
