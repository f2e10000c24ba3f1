"""README.md model cards for the checkpoints of a continual pre-training run."""

from __future__ import annotations

import json

__all__ = ["model_card"]


def _table(domains: list[str], rows: list[tuple[str, list[float]]], general: list[float]) -> str:
    head = "| after | " + " | ".join(domains) + " | general text |\n|---|" + "---|" * (len(domains) + 1) + "\n"
    body = ""
    for (label, values), g in zip(rows, general):
        cells = " | ".join("" if v is None else f"{v:.2f}" for v in values)
        body += f"| {label} | {cells} | {g:.2f} |\n"
    return head + body


def model_card(
    *,
    base_model: str,
    strategy: dict,
    domains_done: list[str],
    all_domains: list[str],
    objective: str,
    perplexity_rows: list[tuple[str, list[float]]],
    general_perplexity: list[float],
    settings: dict,
) -> str:
    """Card text: what the checkpoint is, the domain sequence so far, the strategy and held-out perplexities."""
    seq = " → ".join(domains_done) if domains_done else "(none yet: the starting point)"
    name = strategy.get("name", "?")
    tags = ["hf_softmask", "continual-pretraining", name]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# Continual pre-training checkpoint: {seq}",
        "",
        f"Starting from `{base_model}`, trained with the `{name}` strategy of "
        f"hf_softmask ({objective.upper()} objective) on the domains {seq}, in that order "
        f"(full sequence: {', '.join(all_domains)}).",
        "",
        "`UnitImportance.from_pretrained(<this dir>)` loads the accumulated head/FFN importance when the strategy "
        "keeps one "
        "(DAS: general-knowledge proxy and every finished domain, combined by elementwise max).",
        "",
        "## Strategy",
        "",
        "```json",
        json.dumps(strategy, indent=2, default=str),
        "```",
        "",
        "## Held-out perplexity (rows: after each stage; columns: evaluated on)",
        "",
        _table(all_domains, perplexity_rows, general_perplexity),
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)
