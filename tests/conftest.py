"""Session settings and fixtures: the shipped checkpoints, and tiny models saved with MiniLM's tokenizer.

The helpers the tests import live in ``tests/testing_utils.py``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
import torch

from tests.testing_utils import save_tiny_bert_with_minilm_tokenizer

# Tiny models run many times faster on one thread (no oversubscription on a 2-core CI machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_dir():
    from hf_softmask.utils.assets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M converted once from the shipped GGUF to a plain safetensors checkpoint."""
    from hf_softmask.utils.assets import load_smollm2

    model, tok = load_smollm2()
    d = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    del model
    return d


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, minilm_dir):
    """A tiny BERT masked LM saved with MiniLM's tokenizer: the runners' model in seconds-long runs."""
    from transformers import BertForMaskedLM

    return save_tiny_bert_with_minilm_tokenizer(BertForMaskedLM, tmp_path_factory.mktemp("tiny_mlm"), minilm_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir):
    """A tiny BERT encoder saved with MiniLM's tokenizer: the finetuning runner's backbone in tests."""
    from transformers import BertModel

    return save_tiny_bert_with_minilm_tokenizer(BertModel, tmp_path_factory.mktemp("tiny_bert"), minilm_dir)
