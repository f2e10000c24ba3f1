"""Session settings and fixtures: the shipped checkpoints, and tiny models saved with MiniLM's tokenizer.

The helpers the tests import live in ``tests/testing_utils.py``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# One thread a process, here and in the runs the tests start: tiny models are faster so, and two pytest workers
# (``-n 2``) or a 2-process launch then share a 2-core machine without oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
def smollm2_dir():
    """SmolLM2-135M converted from the shipped GGUF to a plain checkpoint: the runners' cached conversion, so the
    suite dequantizes it once (the runner tests load the same directory)."""
    from hf_softmask.continual.model_loading import smollm2_checkpoint

    return smollm2_checkpoint()


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
