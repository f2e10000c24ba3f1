"""The runners' console lines: ``[runner] message`` on stdout through ``logging``, from the main process only."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .distributed import is_main_process

__all__ = ["Console", "summary_line"]


class _Stdout(logging.StreamHandler):
    """A handler writing to the ``sys.stdout`` of the moment (pytest and notebooks replace it), flushed per line."""

    def emit(self, record):
        self.stream = sys.stdout
        super().emit(record)


class Console:
    """``console(message)`` logs ``[runner] message`` at INFO to stdout (logger ``hf_softmask.<runner>``) on the
    main process only (:func:`~hf_softmask.continual.distributed.is_main_process`: accelerate launch or a process
    group the caller joined), whatever the user's logging configuration: the runner's progress lines are its
    interface. accelerate's own adapter is not used: it prefixes every line with the rank."""

    def __init__(self, runner: str):
        self.log = logging.getLogger(f"hf_softmask.{runner}")
        if not any(isinstance(h, _Stdout) for h in self.log.handlers):
            handler = _Stdout()
            handler.setFormatter(logging.Formatter(f"[{runner}] %(message)s"))
            self.log.addHandler(handler)
            self.log.setLevel(logging.INFO)
            self.log.propagate = False  # printed once, not again by a root handler the user set up

    def __call__(self, message: str) -> None:
        if is_main_process():
            self.log.info(message)


def summary_line(res: dict, out: Path) -> str:
    """The pre-training run's last console line: its headline numbers (results.json) and where everything is."""
    numbers = [
        (label, res.get(key), fmt)
        for label, key, fmt in (
            ("in-domain loss", "in_domain_loss", ".4f"),
            ("forgetting", "forgetting", "+.4f"),
            ("BWT", "bwt", "+.4f"),
            ("general-text loss change", "general_loss_increase", "+.4f"),
        )
    ]
    shown = ", ".join(f"{label} {value:{fmt}}" for label, value, fmt in numbers if value is not None)
    return (
        f"done: {shown}; results in {out / 'results.json'} (loss and perplexity matrices), the model after each "
        f"domain in {out}/<k>_<domain>/, the run's settings in {out / 'run_config.json'}"
    )
