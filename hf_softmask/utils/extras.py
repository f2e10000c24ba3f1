"""Optional dependencies: the extra that installs each, and an error naming it when one is missing."""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "missing_extra", "require"]

#: module -> the extra of hf_softmask that installs it (pyproject.toml, [project.optional-dependencies]).
EXTRAS = {"matplotlib": "plots", "gguf": "gguf"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing_extra(module: str, purpose: str, alternative: str | None = None) -> MissingExtraError:
    """The error saying that ``purpose`` needs ``module``, the extra that installs it, and ``alternative``."""
    message = f"{purpose} needs {module}, which is not installed: pip install 'hf_softmask[{EXTRAS[module]}]'"
    return MissingExtraError(message + (f", {alternative}" if alternative else ""))


def require(module: str, purpose: str, alternative: str | None = None) -> None:
    """Raise :func:`missing_extra`'s error unless ``module`` is importable (found without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise missing_extra(module, purpose, alternative)
