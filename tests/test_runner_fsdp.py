"""The pre-training runner under torch ``fully_shard`` (FSDP2) with 2 gloo processes: train, evaluate, save, resume.

accelerate does not apply FSDP on a CPU, so the processes join by ``torch.distributed`` and the runner's
documented ``model_hook`` shards the model. Evaluation and the gathering of weights for saving must run on every
process (a sharded forward and ``full_tensor`` are collectives); before the fix the runner evaluated and saved on the
main process only and the run hung (here: the subprocess timeout).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from hf_softmask.core.importance import UnitImportance
from tests.testing_utils import run_torch_only_processes, save_tiny_bert_with_minilm_tokenizer, tiny_runner_flags

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist

rank, world, init, out, stop_after = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
torch.set_num_threads(1)
from torch.distributed.fsdp import fully_shard
from hf_softmask.continual import ContinualPretrainer, parse_config
from hf_softmask.continual.distributed import end_processes

def shard(model):
    for layer in model.base_model.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model

def events(event, name, **_):
    if event == "state_saved" and name == stop_after:
        os._exit(17)  # a kill right after the state update of that stage

runner = ContinualPretrainer(parse_config(sys.argv[6:]), model_hook=shard, events=events)
res = runner.run()
d = out / f"rank{rank}"
runner.strategy.importance.save_pretrained(d)
sharded = any(hasattr(p, "full_tensor") for p in runner.model.parameters())
(d / "res.json").write_text(json.dumps({"loss": res["loss_matrix"], "sharded": sharded, "world": runner.world}))
end_processes()
"""


def _launch(tmp_path: Path, run: str, stop_after: str, flags: list[str]) -> list[subprocess.CompletedProcess]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    init, res = tmp_path / f"init_{run}", tmp_path / "res"
    return run_torch_only_processes(
        worker, lambda r: [str(r), "2", str(init), str(res), stop_after, *flags], timeout=240
    )


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.slow
@pytest.mark.distributed
def test_fully_shard_das_domain_trains_evaluates_saves_and_resumes(tmp_path, minilm_dir):
    model_dir = save_tiny_bert_with_minilm_tokenizer(BertForMaskedLM, tmp_path / "model", minilm_dir)
    out = tmp_path / "run"
    flags = tiny_runner_flags(model_dir, out, max_steps=3, save_strategy="no", logging_steps=1, strategy="das")

    killed = _launch(tmp_path, "a", "1_business", flags)
    assert killed[0].returncode == 17, killed[0].stderr[-3000:]
    assert killed[1].returncode != 0  # its peer died: it stops too (a launcher would kill it), it does not hang
    state = json.loads((out / "state.json").read_text())
    assert [d["domain"] for d in state["domains"]] == ["business"]
    first = _digest(out / "1_business")

    done = _launch(tmp_path, "b", "none", flags)
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]
    assert "skipping finished: business" in done[0].stdout and "domain 2/2: sports" in done[0].stdout
    assert "domain 2/2" not in done[1].stdout  # console lines from the main process only
    assert _digest(out / "1_business") == first  # resumed, not retrained
    res = [json.loads((tmp_path / "res" / f"rank{r}" / "res.json").read_text()) for r in range(2)]
    assert res[0]["sharded"] and res[0]["world"] == 2
    assert res[0]["loss"] == res[1]["loss"]  # evaluation ran on both ranks, on the same full model
    imp = [UnitImportance.from_pretrained(tmp_path / "res" / f"rank{r}") for r in range(2)]
    assert torch.equal(imp[0].heads, imp[1].heads) and torch.equal(imp[0].ffn, imp[1].ffn)
    saved = UnitImportance.from_pretrained(out / "2_sports")
    assert torch.equal(saved.heads, imp[0].heads) and imp[0].heads.std() > 0
    # the saved weights are the full model, loadable as a plain checkpoint
    model = AutoModelForMaskedLM.from_pretrained(out / "2_sports")
    assert type(model).__name__ == "BertForMaskedLM"
    assert json.loads((out / "results.json").read_text())["complete"]
