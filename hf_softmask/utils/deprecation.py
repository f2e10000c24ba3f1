"""Old public names and module paths kept working after a rename: each warns once (FutureWarning) and resolves to
the new one."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable

__all__ = ["alias_moved_modules", "renamed_attributes", "warn_renamed"]

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


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves each old module path as the module at its new path (the same object), warning once."""

    def __init__(self, moves: dict[str, str]):
        self.moves = moves

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in self.moves else None

    def create_module(self, spec):
        warn_renamed(spec.name, self.moves[spec.name], stacklevel=8)
        return importlib.import_module(self.moves[spec.name])

    def exec_module(self, module):
        pass  # the module at the new path is already executed


def alias_moved_modules(moves: dict[str, str]) -> None:
    """Make ``import old.path`` give the module at ``new``, for each ``old -> new`` in ``moves`` (dotted names)."""
    if not any(isinstance(f, _MovedModules) and f.moves == moves for f in sys.meta_path):
        sys.meta_path.append(_MovedModules(moves))
