"""Shared fixtures: tiny real transformers models built from configs, and the shipped checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
import torch

# Tiny models run many times faster on one thread (no oversubscription on a 2-core CI machine).
torch.set_num_threads(1)

VOCAB = 128


def tiny_bert(seed=0, **kw):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **kw,
    )
    return BertForMaskedLM(cfg)


def tiny_gpt2(seed=0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **kw
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **kw,
    )
    return LlamaForCausalLM(cfg)


def tiny_distilbert(seed=0, **kw):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    cfg = DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, **kw
    )
    return DistilBertForMaskedLM(cfg)


TINY_MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "distilbert": tiny_distilbert}


def random_lm_batches(n_batches=4, batch_size=4, seq_len=16, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if labels:
            b["labels"] = ids.clone()
        out.append(b)
    return out


def save_tiny_bert_with_minilm_tokenizer(model_cls, directory, tokenizer_dir):
    """A 2-layer BERT (``model_cls``: BertModel, BertForMaskedLM, ...) with MiniLM's tokenizer, so that real
    text tokenizes, saved like any checkpoint into ``directory``."""
    from transformers import AutoTokenizer, BertConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = model_cls(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def minilm_dir():
    from hf_softmask.assets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M converted once from the shipped GGUF to a plain safetensors checkpoint."""
    from hf_softmask.assets import load_smollm2

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


def tiny_runner_flags(model_dir, out, **overrides) -> list[str]:
    """Flags of a seconds-long continual pre-training run (2 BBC domains, 4 steps each, tiny blocks, no plots).

    ``overrides`` replace or add flags; a value of None gives a bare flag (``--bf16``)."""
    flags = {
        "model_name_or_path": str(model_dir),
        "domains": "business,sports",
        "max_train_docs": 12,
        "max_eval_docs": 4,
        "block_size": 32,
        "max_train_blocks": 16,
        "max_eval_blocks": 2,
        "importance_blocks": 4,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "save_steps": 2,
        "logging_steps": 2,
        "num_threads": 1,
        "plots": "false",
        "output_dir": str(out),
    }
    flags.update(overrides)
    return [x for k, v in flags.items() for x in ((f"--{k}",) if v is None else (f"--{k}", str(v)))]


#: A script running the pre-training runner with a test callback that kills the process (os._exit(17)) once the
#: Trainer checkpoint of step S of domain directory D is on disk: ``python worker.py D:S <flags>`` ("none": no kill).
RUNNER_KILL_WORKER = """
import os, sys
from transformers import TrainerCallback
from hf_softmask.continual import ContinualPretrainer, parse_config

domain, step = sys.argv[1].split(":") if sys.argv[1] != "none" else ("", "0")

class DieAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if domain and args.output_dir.endswith(domain) and state.global_step >= int(step):
            os._exit(17)

ContinualPretrainer(parse_config(sys.argv[2:]), callbacks=[DieAfterSave()]).run()
"""


def accelerate_launch_cmd(num_processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``num_processes`` processes on this machine (torchrun launcher: gloo on a CPU)."""
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def launch_cpu_processes(script, *args, port_offset: int = 0, timeout: int = 600):
    """Run ``script`` with ``args`` under ``accelerate launch`` as 2 gloo processes on this CPU, with the tests and
    the repository on ``PYTHONPATH``; asserts it exits 0 and returns the finished process."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]),
    )
    port = str(29500 + (os.getpid() + port_offset) % 2000)
    cmd = [*accelerate_launch_cmd(2), "--main_process_port", port, str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc
