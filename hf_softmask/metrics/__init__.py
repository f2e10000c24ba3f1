"""Evaluation metrics bundled with hf_softmask, loadable by ``evaluate`` from a local path (no Hub access)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["available_metrics", "load_metric", "metric_path"]

_HERE = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the bundled metrics (each a directory holding ``<name>/<name>.py``)."""
    return sorted(p.name for p in _HERE.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> Path:
    """Directory of the bundled metric ``name``; ValueError listing the available names if unknown."""
    if name not in available_metrics():
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(available_metrics())}")
    return _HERE / name


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of the bundled metric ``name`` (extra kwargs go to ``evaluate.load``)."""
    import evaluate

    # A local directory path makes evaluate import the script directly instead of resolving a Hub repo.
    return evaluate.load(str(metric_path(name)), **kwargs)
