"""Files shipped inside the package: the commands' stored ``--help`` text and the example configs.

Light on purpose (no torch, no transformers): ``hf-softmask <command> --help`` reads from here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HELP_DIR", "CONFIG_DIR", "help_file", "config_file", "shipped_configs"]

_HERE = Path(__file__).resolve().parents[1]  # the hf_softmask package

#: ``<script>.txt``: each command's --help, written by ``python -m hf_softmask.continual.cli`` (a test checks it).
HELP_DIR = _HERE / "continual" / "help"

#: The repository's ``configs/`` (a link to it in a checkout, a copy in a wheel).
CONFIG_DIR = _HERE / "configs"


def help_file(script: str) -> Path:
    return HELP_DIR / f"{script}.txt"


def shipped_configs() -> list[str]:
    """Names of the shipped configs, relative to ``configs/`` and without ``.yaml`` (``default``,
    ``accelerate/fsdp``, ...)."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def config_file(name_or_path: str, flag: str = "--config") -> Path:
    """A YAML config: the file ``name_or_path`` if it exists, else the shipped one it names (``default``,
    ``default.yaml`` and ``configs/default.yaml`` all name ``configs/default.yaml``), so the documented
    ``--config configs/<name>.yaml`` works from any directory once the package is installed. Errors name ``flag``."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise FileNotFoundError(f"{flag} {name_or_path}: not a file")
    name = Path(name_or_path).as_posix().removeprefix("configs/").removesuffix(".yaml")
    shipped = CONFIG_DIR / f"{name}.yaml"
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"{flag} {name_or_path}: no such file, nor a shipped config; shipped: {', '.join(shipped_configs())}"
    )
