"""Two processes (accelerate launch, gloo on CPU) compute identical importance from different data shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from hf_softmask.importance import UnitImportance

WORKER = '''
import json, sys
from pathlib import Path
import torch
from hf_softmask.continual import ContinualPretrainer, parse_config

out = Path(sys.argv[1])
runner = ContinualPretrainer(parse_config(sys.argv[2:]))
runner.run()  # general importance, one DAS domain trained under DDP, the domain's importance
d = out / f"rank{runner.rank}"
runner.strategy.importance.save_pretrained(d)
runner.strategy.general_importance.save_pretrained(d / "general")
loader = runner.data.importance_loader(runner.data.train[0], 1, runner.rank, runner.world)
ids = torch.cat([b["input_ids"] for b in loader])
(d / "shard.json").write_text(json.dumps({"world": runner.world, "ids": ids[:, :16].tolist()}))
'''


@pytest.mark.distributed
def test_two_processes_get_identical_importance(tmp_path, minilm_dir):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not on PATH")
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    flags = ["--model_name_or_path", str(tmp_path / "model"), "--domains", "business", "--max_train_docs", "12",
             "--max_eval_docs", "4", "--block_size", "32", "--max_train_blocks", "16", "--max_eval_blocks", "2",
             "--importance_blocks", "8", "--max_steps_per_domain", "2", "--per_device_train_batch_size", "2",
             "--save_steps", "100", "--plots", "false", "--num_threads", "1", "--output_dir", str(tmp_path / "run")]
    # `--multi_gpu` picks accelerate's torchrun launcher, which runs gloo on a CPU-only machine; `--cpu` alone
    # selects the single-process launcher (it needs an MPI hostfile for more than one process).
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(worker), str(tmp_path / "out"), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "out"
    shards = [json.loads((out / f"rank{r}" / "shard.json").read_text()) for r in (0, 1)]
    assert shards[0]["world"] == shards[1]["world"] == 2
    assert shards[0]["ids"] != shards[1]["ids"]  # each rank estimated on its own share of the sample
    for sub in ("general", ""):
        a = UnitImportance.from_pretrained(out / "rank0" / sub)
        b = UnitImportance.from_pretrained(out / "rank1" / sub)
        assert torch.equal(a.heads, b.heads) and torch.equal(a.ffn, b.ffn)
        assert a.heads.std() > 0  # a real estimate, not a constant
    # the main process's checkpoint holds the same accumulated importance
    saved = UnitImportance.from_pretrained(tmp_path / "run" / "1_business")
    assert torch.equal(saved.heads, UnitImportance.from_pretrained(out / "rank1").heads)
