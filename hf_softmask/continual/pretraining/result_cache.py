"""Results the runners compute once and reuse, keyed by everything that determines them (``HF_SOFTMASK_CACHE``).

An entry is a directory ``<cache>/<kind>/<key[:32]>``, published by renaming a finished staging directory into
place, so a reader never sees half of one and two processes writing the same entry leave one whole copy. A cache
that cannot be written costs the next run the recomputation, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..checkpointing import publish_once, stage_dir

__all__ = ["cache_entry", "content_key", "publish_entry"]

logger = logging.getLogger(__name__)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def content_key(settings: dict, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 of ``settings`` (JSON, sorted keys; torch's version added) and of every named tensor's dtype, shape
    and bytes, in the order given."""
    h = hashlib.sha256()
    h.update(json.dumps({**settings, "torch": torch.__version__}, sort_keys=True, default=str).encode())
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def cache_entry(kind: str, key: str) -> Path:
    """The directory of entry ``key`` of ``kind`` (it may not exist)."""
    from ..model_loading import cache_dir

    return cache_dir() / kind / key[:32]


def publish_entry(entry: Path, write: Callable[[Path], None]) -> bool:
    """``write(staging_directory)``, then the staging directory renamed to ``entry``; False (logged) when the cache
    cannot be written."""
    try:
        staging = stage_dir(entry.parent, f"{entry.name}.{os.getpid()}")
        write(staging)
        publish_once(staging, entry)
        return True
    except OSError as e:
        logger.warning("not cached in %s (%s)", entry, e)
        return False
