"""Two processes (accelerate launch, gloo on CPU) compute identical importance from different data shards."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertForMaskedLM

from hf_softmask.core.importance import UnitImportance
from tests.testing_utils import (
    launch_cpu_processes,
    random_lm_batches,
    save_tiny_bert_with_minilm_tokenizer,
    tiny_llama,
)

WORKER = """
import json, sys
from pathlib import Path
import torch
from hf_softmask.continual import ContinualPretrainer, parse_config
from hf_softmask.continual.distributed import end_processes

out = Path(sys.argv[1])
runner = ContinualPretrainer(parse_config(sys.argv[2:]))
runner.run()  # general importance, one DAS domain trained under DDP, the domain's importance
d = out / f"rank{runner.rank}"
runner.strategy.importance.save_pretrained(d)
runner.strategy.general_importance.save_pretrained(d / "general")
loader = runner.data.importance_loader(runner.data.train[0], 1, runner.rank, runner.world)
ids = torch.cat([b["input_ids"] for b in loader])
(d / "shard.json").write_text(json.dumps({"world": runner.world, "ids": ids[:, :16].tolist()}))
end_processes()
"""


@pytest.mark.distributed
def test_two_processes_get_identical_importance(tmp_path, minilm_dir):
    save_tiny_bert_with_minilm_tokenizer(BertForMaskedLM, tmp_path / "model", minilm_dir)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    flags = [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--domains",
        "business",
        "--max_train_docs",
        "12",
        "--max_eval_docs",
        "4",
        "--block_size",
        "32",
        "--max_train_blocks",
        "16",
        "--max_eval_blocks",
        "2",
        "--importance_blocks",
        "8",
        "--max_steps_per_domain",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--save_steps",
        "100",
        "--plots",
        "false",
        "--num_threads",
        "1",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    launch_cpu_processes(worker, tmp_path / "out", *flags, timeout=400)

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


ESTIMATOR_WORKER = """
import sys
import torch
import torch.distributed as dist
from tests.testing_utils import random_lm_batches, tiny_bert, tiny_llama
from hf_softmask import available_estimators, compute_importance
from hf_softmask.continual.distributed import end_processes

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
batches = random_lm_batches(4, batch_size=2, seq_len=12, seed=5)
out = {}
for arch, make in (("bert", tiny_bert), ("llama", tiny_llama)):
    model = make()  # the BERT keeps its dropout: ranks draw different masks, the all-reduced sums still agree
    for estimator in available_estimators():
        for objective in ("kl_dropout", "lm_loss"):
            imp = compute_importance(model, batches[rank::world], objective, estimator=estimator, normalize=False,
                                     show_progress=False)
            out[(arch, estimator, objective)] = (imp.heads, imp.ffn, imp.meta["tokens"])
torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
end_processes()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_every_estimator_is_identical_on_two_gloo_processes(tmp_path):
    """Each rank estimates on half the batches; after the all-reduce both hold the same importance, equal to one
    process on all batches (deterministic cases: the dropout-free Llama under lm_loss)."""
    from hf_softmask import available_estimators, compute_importance

    worker = tmp_path / "worker.py"
    worker.write_text(ESTIMATOR_WORKER)
    launch_cpu_processes(worker, tmp_path, timeout=400)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(r0) == 2 * len(available_estimators()) * 2
    for key, (h0, f0, t0) in r0.items():
        h1, f1, t1 = r1[key]
        assert torch.equal(h0, h1) and torch.equal(f0, f1) and t0 == t1, key
        assert h0.std() > 0, key
    batches = random_lm_batches(4, batch_size=2, seq_len=12, seed=5)
    for estimator in available_estimators():
        one = compute_importance(
            tiny_llama(), batches, "lm_loss", estimator=estimator, normalize=False, show_progress=False
        )
        h, f, t = r0[("llama", estimator, "lm_loss")]
        assert t == one.meta["tokens"]
        torch.testing.assert_close(h, one.heads, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(f, one.ffn, rtol=1e-4, atol=1e-9)
