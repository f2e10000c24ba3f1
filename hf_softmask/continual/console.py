"""The runners' console lines: ``[runner] message``, printed by the main process only."""

from __future__ import annotations

__all__ = ["Console"]


class Console:
    """``console(message)`` prints ``[runner] message`` on the main process (flushed: lines interleave with logs)."""

    def __init__(self, runner: str, is_main: bool):
        self.runner, self.is_main = runner, is_main

    def __call__(self, message: str) -> None:
        if self.is_main:
            print(f"[{self.runner}] {message}", flush=True)
