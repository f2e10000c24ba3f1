"""The runners' console lines: ``[runner] message``, printed by the main process only."""

from __future__ import annotations

from pathlib import Path

__all__ = ["Console", "summary_line"]


class Console:
    """``console(message)`` prints ``[runner] message`` on the main process (flushed: lines interleave with logs)."""

    def __init__(self, runner: str, is_main: bool):
        self.runner, self.is_main = runner, is_main

    def __call__(self, message: str) -> None:
        if self.is_main:
            print(f"[{self.runner}] {message}", flush=True)


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
