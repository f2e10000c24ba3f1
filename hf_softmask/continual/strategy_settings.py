"""``strategy_kwargs`` of both runners: a JSON object on the command line, a mapping in YAML and in sweep entries.

The same parsing serves the other flags that hold a JSON object (``compare_strategies.py``'s overrides).
"""

from __future__ import annotations

import json

__all__ = ["parse_json_object", "parse_strategy_kwargs", "strategy_kwargs_text", "build_strategy"]


def strategy_kwargs_text(value):
    """A mapping as the JSON text the ``strategy_kwargs`` field holds (YAML and sweep entries give mappings)."""
    return json.dumps(value) if isinstance(value, dict) else value


def parse_json_object(value, flag: str) -> dict:
    """The mapping a settings flag holds (JSON text, a mapping from YAML, or empty); ValueError naming ``--flag``."""
    if not value or (isinstance(value, str) and not value.strip()):
        return {}
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--{flag} must be a JSON object, got {value!r}: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"--{flag} must be a JSON object, got {value!r}")
    return dict(parsed)


def parse_strategy_kwargs(value) -> dict:
    """The strategy's keyword settings from ``strategy_kwargs`` (JSON text, a mapping, or empty)."""
    return parse_json_object(value, "strategy_kwargs")


def build_strategy(cls, name: str, strategy_kwargs: dict, offered: dict | None = None):
    """``cls(**offered, **strategy_kwargs)`` (the user's settings win); a setting the strategy does not take is a
    ValueError naming ``--strategy_kwargs``."""
    try:
        return cls(**{**(offered or {}), **strategy_kwargs})
    except TypeError as e:
        raise ValueError(f"--strategy_kwargs {strategy_kwargs}: not accepted by strategy {name!r} ({e})") from None
