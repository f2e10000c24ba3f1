"""Old public names kept working after a rename: each warns once (FutureWarning) and resolves to the new name."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

__all__ = ["renamed_attributes", "warn_renamed"]

_warned: set[str] = set()


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """FutureWarning that the dotted name ``old`` is now ``new``; once per process and name."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release: use {new}", FutureWarning, stacklevel=stacklevel
    )


def renamed_attributes(module: str, renamed: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` serving each old name in ``renamed`` (old -> new) as the module's attribute ``new``."""

    def __getattr__(name: str):
        new = renamed.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warn_renamed(f"{module}.{name}", f"{module}.{new}")
        return getattr(sys.modules[module], new)

    return __getattr__
