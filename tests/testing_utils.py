"""What the tests share: tiny real transformers models, toy data, TrainingArguments, training loops, launchers.

Tests import from here (``from tests.testing_utils import tiny_llama``); ``conftest.py`` holds only fixtures and
session settings. The 2-process workers import from here too: ``launch_cpu_processes`` puts the repository root on
their ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Vocabulary of the tiny models and of the random token data.
VOCAB = 128


# -- tiny models --------------------------------------------------------------------------------------------------
def tiny_bert(seed=0, model_cls=None, **kw):
    """A 2-layer BERT (hidden 32, 4 heads), a masked LM unless ``model_cls`` says otherwise (BertModel, ...)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return (model_cls or BertForMaskedLM)(BertConfig(**{**cfg, **kw}))


def tiny_gpt2(seed=0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **kw
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama(seed=0, **kw):
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
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


def save_tiny_bert_with_minilm_tokenizer(model_cls, directory, tokenizer_dir):
    """A 2-layer BERT (``model_cls``: BertModel, BertForMaskedLM, ...) with MiniLM's tokenizer, so that real
    text tokenizes, saved like any checkpoint into ``directory``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_bert(model_cls=model_cls, vocab_size=tok.vocab_size)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# -- toy data -----------------------------------------------------------------------------------------------------
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


def lm_rows(n_rows=16, seq_len=12, seed=0, batch_size=4):
    """``n_rows`` random LM rows (labels = input ids) as a ``datasets.Dataset``: the rows of
    ``random_lm_batches(n_rows // batch_size, batch_size, seq_len, seed)``."""
    import datasets

    ids = torch.cat([b["input_ids"] for b in random_lm_batches(n_rows // batch_size, batch_size, seq_len, seed)])
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


class ExampleDataset(Dataset):
    """Examples (dicts of 1-D tensors) cut from whole batches."""

    def __init__(self, batches):
        self.examples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def lm_dataset(n_batches=4, batch_size=4, seq_len=16, seed=0):
    return ExampleDataset(random_lm_batches(n_batches, batch_size, seq_len, seed))


def task_dataset(task_id: int, n: int = 24, seq_len: int = 12, num_labels: int = 2, seed: int = 0):
    """A learnable toy classification task: the label is decided by which token range dominates the sequence."""
    import datasets

    g = torch.Generator().manual_seed(1000 * seed + task_id)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    width = (VOCAB - 1) // num_labels
    ids = 1 + labels[:, None] * width + torch.randint(0, width, (n, seq_len), generator=g)
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": labels.tolist(),
            "task_ids": [task_id] * n,
        }
    ).with_format("torch")


def batch_of(dataset, k: int = 8) -> dict:
    rows = dataset[:k]
    return {key: rows[key] for key in ("input_ids", "attention_mask", "task_ids")}


# -- training -----------------------------------------------------------------------------------------------------
def train_args(output_dir, cls=None, **overrides):
    """``cls`` (TrainingArguments unless given) for a quiet, seeded CPU run: no reports, checkpoints, logs, progress
    bars or dataloader workers; one epoch at batch 4, learning rate 1e-2, weight decay 0.1. ``overrides`` replace or
    add arguments."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    return (cls or TrainingArguments)(**{**base, **overrides})


def run_task(model, strategy, dataset, output_dir, task_id, optimizers=(None, None), after=True, **args):
    """before_task -> StrategyTrainer.train() -> after_task, like the continual runners do."""
    from hf_softmask.strategies import StrategyTrainer

    loader = DataLoader(dataset, batch_size=args.get("per_device_train_batch_size", 4))
    strategy.before_task(model, task_id, loader)
    trainer = StrategyTrainer(
        model=model,
        args=train_args(output_dir, **args),
        train_dataset=dataset,
        strategy=strategy,
        optimizers=optimizers,
    )
    trainer.train()
    if after:
        strategy.after_task(model, task_id, loader)
    return trainer


#: What ``train_task`` trains a classification task with, unless its caller says otherwise.
TASK_TRAINING = dict(
    per_device_train_batch_size=8,
    num_train_epochs=2,
    learning_rate=2e-2,
    weight_decay=0.01,
    lr_scheduler_type="constant",
)


def train_task(model, strategy, dataset, task_id: int, output_dir, head_lr: float = 1e-2, **args):
    """What the finetuning runner does for one task of a MultiTaskClassifier: select it, train its head + the
    strategy's parameters, then after_task."""
    from hf_softmask.continual.finetuning import build_optimizer
    from hf_softmask.strategies import StrategyTrainer

    model.set_task(task_id)
    model.train_only_head(task_id)
    loader = DataLoader(dataset, batch_size=8)
    strategy.before_task(model, task_id, loader)
    targs = train_args(output_dir, **{**TASK_TRAINING, **args})
    opt = build_optimizer(model, targs.learning_rate, head_lr, targs.weight_decay)
    StrategyTrainer(model=model, args=targs, train_dataset=dataset, strategy=strategy, optimizers=(opt, None)).train()
    strategy.after_task(model, task_id, loader)


@torch.no_grad()
def logits_of(model, batches):
    """The LM logits of ``batches`` (input ids and attention masks only), concatenated, in eval mode."""
    model.eval()
    out = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])
    return out


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    """The logits of one batch in eval mode; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    try:
        return model(**batch).logits.clone()
    finally:
        model.train(was)


def one_thread():
    """Generator body for an autouse fixture: tiny models run far faster on one thread of a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the pre-training runner --------------------------------------------------------------------------------------
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


def straight_and_killed_then_resumed(tmp_path: Path, flags_for, kill: str = "2_sports:2"):
    """Run the pre-training runner uninterrupted (``tmp_path/straight``) and, side by side, the same run killed
    right after its Trainer checkpoint ``kill`` = ``<k>_<domain>:<step>`` (``tmp_path/killed``); then rerun the
    killed one to its end. ``flags_for(out)``: the runner's flags. Returns the resumed process; asserts the first
    two ended as meant (exit 0, and 17 at the kill). One thread a process: the pair runs on two cores at once."""
    worker = tmp_path / "worker.py"
    worker.write_text(RUNNER_KILL_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}

    def command(out: Path, stop: str) -> list[str]:
        return [sys.executable, str(worker), stop, *flags_for(out)]

    pair = {
        name: subprocess.Popen(
            command(tmp_path / name, stop), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, stop in (("straight", "none"), ("killed", kill))
    }
    ended = {name: (p, *p.communicate(timeout=300)) for name, p in pair.items()}
    for name, code in (("straight", 0), ("killed", 17)):
        p, _, err = ended[name]
        assert p.returncode == code, f"{name}: exit {p.returncode}\n{err[-3000:]}"
    return subprocess.run(command(tmp_path / "killed", "none"), env=env, capture_output=True, text=True, timeout=300)


#: A launcher's script that runs ``main(flags)`` of the runner script ``sys.argv[1]``, then writes to
#: ``<sys.argv[2]>.<rank>`` whether a process group is still up: ``python worker.py SCRIPT REPORT <flags>``.
#: A group left to interpreter teardown aborts a finished run now and then (gloo: SIGABRT, "terminate called
#: without an active exception"), so a runner's main must end it.
MAIN_THEN_REPORT_PROCESS_GROUP = """
import os, runpy, sys
import torch.distributed as dist

runpy.run_path(sys.argv[1])["main"](sys.argv[3:])
with open(f"{sys.argv[2]}.{os.environ.get('RANK', '0')}", "w") as f:
    f.write("up" if dist.is_initialized() else "ended")
"""


# -- several processes --------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on this machine now: concurrent launches (pytest -n 2) never share a rendezvous port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torch_only_processes(
    worker: Path, args_of_rank, world_size: int = 2, timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """``python worker <args_of_rank(rank)>`` in ``world_size`` processes at once, with none of a launcher's
    variables (the worker joins them by ``torch.distributed`` alone), one thread each; every process is killed and
    the test fails if one hangs (a collective entered by one rank only)."""
    import pytest

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *args_of_rank(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the {world_size}-process run of {worker.name} hung")
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def accelerate_launch_cmd(num_processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``num_processes`` processes on this machine. Several use the torchrun launcher
    (``--multi_gpu``, on a port of its own), which runs gloo on a CPU; one uses ``--cpu`` (which runs ONE process
    whatever ``--num_processes`` says, and needs an MPI hostfile for more)."""
    port = ["--main_process_port", str(free_port())] if num_processes > 1 else []
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu" if num_processes > 1 else "--cpu",
        "--num_processes",
        str(num_processes),
        *port,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def launch_cpu_processes(script, *args, num_processes: int = 2, timeout: int = 600):
    """Run ``script`` with ``args`` under ``accelerate launch`` as ``num_processes`` gloo processes on this CPU, with
    the repository on ``PYTHONPATH`` (``tests.testing_utils`` imports); asserts it exits 0 and returns the finished
    process."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [*accelerate_launch_cmd(num_processes), str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
