"""The runners' models: a model name to a loadable path, the cached conversion of the shipped GGUF, and loading.

``--model_name_or_path`` is a checkpoint directory, a Hub id, or a shipped model's name
(:data:`hf_softmask.utils.assets.SHIPPED_MODELS`). Whether a checkpoint is a masked LM is decided by
:func:`hf_softmask.data.is_masked_lm`, from its config before loading and from the model after.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..data import is_masked_lm
from ..utils.assets import load_smollm2, minilm_path, shipped_model
from .checkpointing import publish_once, stage_dir

logger = logging.getLogger(__name__)

__all__ = ["smollm2_checkpoint", "resolve_model_path", "load_model_and_tokenizer", "load_note", "load_backbone"]


def cache_dir() -> Path:
    """Where the runners keep what they make once (``HF_SOFTMASK_CACHE``, default ~/.cache/hf_softmask)."""
    return Path(os.environ.get("HF_SOFTMASK_CACHE", Path.home() / ".cache" / "hf_softmask"))


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M converted once from the shipped GGUF to a plain checkpoint in the cache (~30 s the first time)."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    model, tok = load_smollm2()
    staging = stage_dir(target.parent, target.name + f".{os.getpid()}")
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    publish_once(staging, target)  # two processes converting at once: the first one's stays
    return target


def resolve_model_path(name: str) -> str:
    """A directory ``from_pretrained`` opens for a shipped model's name (SmolLM2: its cached conversion, made on first
    use); any other name as given."""
    shipped = shipped_model(name)
    if shipped == "minilm":
        return str(minilm_path())
    if shipped == "smollm2":
        return str(smollm2_checkpoint())
    return name


def wants_mlm(path: str, objective: str) -> bool:
    """Whether the checkpoint at ``path`` trains as a masked LM: ``objective`` 'mlm' / 'clm', or 'auto' (by config)."""
    if objective != "auto":
        return objective == "mlm"
    from transformers import AutoConfig

    return is_masked_lm(AutoConfig.from_pretrained(path))


def load_model_and_tokenizer(path: str, objective: str = "auto", tokenizer_path: str | None = None, say=None):
    """``(model, tokenizer, mlm)``: AutoModelForMaskedLM for encoders (or objective 'mlm'), else causal LM.

    transformers' load report (and its "checkpoint seem corrupted" for an absent tied head bias) is replaced by
    one line from :func:`load_note`, given to ``say`` (default: logged as a warning).
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    mlm = wants_mlm(path, objective)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = (AutoModelForMaskedLM if mlm else AutoModelForCausalLM).from_pretrained(
            path, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(level)
    note = load_note(model, info, path)
    if note is not None:
        (say or logger.warning)(note)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if mlm != is_masked_lm(model):
        raise ValueError(f"{path}: objective {objective!r} does not fit the loaded {type(model).__name__}")
    return model, tokenizer, mlm


def load_note(model, info: dict, path: str) -> str | None:
    """One line on what ``from_pretrained`` did not load: a fresh LM head (expected for an encoder shipped without
    its MLM head, which ``--lm_head_warmup_steps`` fits) or, worse, base-model weights left random."""
    base = getattr(model, "base_model_prefix", "") + "."
    missing = sorted(info.get("missing_keys") or [])
    body = [k for k in missing if k.startswith(base)]
    head = [k for k in missing if not k.startswith(base)]
    unused = sorted(info.get("unexpected_keys") or [])
    if body:
        return (
            f"{path}: {len(body)} weight(s) of the base model are not in the checkpoint and start random "
            f"({', '.join(body[:4])}{', ...' if len(body) > 4 else ''}); is it the model you meant?"
        )
    if not head:
        return None
    groups = sorted({k.split(".")[0] + ".*" for k in head})
    text = (
        f"{path} has no trained {type(model).__name__} head: {len(head)} tensor(s) ({', '.join(groups)}) start "
        "freshly initialised; --lm_head_warmup_steps fits them on general text before the first domain"
    )
    if unused:
        text += f" ({len(unused)} checkpoint tensor(s) unused by this class: {', '.join(unused)})"
    return text


def load_backbone(name_or_path: str):
    """(base model without its LM head, tokenizer with a pad token) for a path, Hub id, 'minilm' or 'smollm2'."""
    from transformers import AutoModel, AutoTokenizer

    if shipped_model(name_or_path) == "smollm2":
        # Straight from the shipped GGUF (no cached conversion written): load the causal LM, keep its decoder.
        lm, tokenizer = load_smollm2()
        backbone = lm.get_decoder()
        backbone.config = lm.config
    else:
        path = resolve_model_path(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        backbone = AutoModel.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return backbone, tokenizer
