"""Soft-masking under ``accelerate launch`` with 2 CPU processes (gloo) equals a single-process run.

This file is also the worker the tests launch (``python -m accelerate.commands.launch --multi_gpu
--num_processes 2 tests/test_distributed_masking.py --out DIR`` with ``ACCELERATE_USE_CPU=true``; one
process: ``--cpu``). Each launch trains every configuration once on a tiny Llama:

- a real ``Trainer`` with ``SoftMaskCallback`` (DDP through accelerate), update and grad mode;
- FSDP2 (torch ``fully_shard``: DTensor parameters) with a hand-written loop, update and grad mode
  (accelerate 1.15 does not apply FSDP on a CPU; see README, "Performance and scale-out").

Importance is computed on each rank's share of the data and all-reduced. Both launches see the same
global batches in the same order, so final parameters must agree up to reduction-order rounding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from tests.testing_utils import VOCAB, launch_cpu_processes, random_lm_batches, tiny_llama, train_args

GLOBAL_BATCH = 4
SEQ_LEN = 16
STEPS = 4
# Adam's default eps (1e-8) turns rounding-level gradients (1e-9, sign depending on reduction order) into
# full lr-sized steps; a larger eps keeps the comparison about masking, not about noise amplification.
ADAM_EPS = 1e-4


# -- worker (runs inside each launched process) ---------------------------------------------------
class _Blocks(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _save_params(model, path: Path, rank: int) -> list[str]:
    from safetensors.torch import save_file

    params = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # FSDP2 DTensor shard -> the full parameter (a collective: every rank calls it)
            t = t.full_tensor()
        params[name] = t.contiguous().clone()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(params, str(path))
    return sorted({type(p).__name__ for p in model.parameters()})


def _trainer_run(out: Path, mode: str, importance, rank: int, world: int) -> dict:
    """A real transformers Trainer with SoftMaskCallback (DDP through accelerate when world > 1)."""
    from transformers import Trainer

    from hf_softmask import SoftMaskCallback

    args = train_args(
        out / "trainer",
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=5e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        adam_epsilon=ADAM_EPS,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(
        model=tiny_llama(seed=0),
        args=args,
        train_dataset=_Blocks(GLOBAL_BATCH * STEPS),
        callbacks=[SoftMaskCallback(importance, mode=mode)],
    )
    trainer.train()
    return {
        "world": world,
        "wrapper": type(trainer.model_wrapped).__name__,
        "param_types": _save_params(trainer.model, out / f"trainer_{mode}" / "params.safetensors", rank),
    }


def _fsdp2_run(out: Path, mode: str, importance, rank: int, world: int) -> dict:
    """FSDP2 (``fully_shard``, DTensor parameters) with a hand-written loop; one process: no sharding.

    accelerate 1.15 does not apply FSDP on CPU (see README, "Performance and scale-out"), so the sharding is
    torch's own; the processes still come from ``accelerate launch``. Grad mode runs without clipping: under FSDP2 the
    grad mask is applied after clipping (ShardedGradMask).
    """
    from hf_softmask import SoftMaskConfig, SoftMasker

    model = tiny_llama(seed=0)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-2,
        eps=ADAM_EPS,
        foreach=True,
    )
    masker = SoftMasker(model, importance, SoftMaskConfig(mode=mode)).attach(opt)
    data = _Blocks(GLOBAL_BATCH * STEPS).ids
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        ids = data[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH][rank * per : (rank + 1) * per]
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        if mode == "update":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    masker.detach()
    if mode == "update":  # importance of the sharded model (gates hook the all-gathered modules)
        from hf_softmask import compute_importance

        batches = random_lm_batches(n_batches=2, batch_size=2, seq_len=SEQ_LEN, seed=2)
        compute_importance(model, batches[rank::world], objective="lm_loss", show_progress=False).save_pretrained(
            out / f"fsdp2_importance_rank{rank}"
        )
    return {"world": world, "param_types": _save_params(model, out / f"fsdp2_{mode}" / "params.safetensors", rank)}


def _worker(out_dir: str) -> None:
    from accelerate import PartialState

    from hf_softmask import compute_importance

    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    out = Path(out_dir)
    # Each rank sees only its share of the importance data; compute_importance all-reduces the sums.
    batches = random_lm_batches(n_batches=4, batch_size=2, seq_len=SEQ_LEN, seed=1)
    importance = compute_importance(tiny_llama(seed=0), batches[rank::world], objective="lm_loss", show_progress=False)
    importance.save_pretrained(out / f"importance_rank{rank}")
    info = {}
    for mode in ("update", "grad"):
        info[f"trainer_{mode}"] = _trainer_run(out, mode, importance, rank, world)
        state.wait_for_everyone()
    for mode in ("update", "grad"):
        info[f"fsdp2_{mode}"] = _fsdp2_run(out, mode, importance, rank, world)
        state.wait_for_everyone()
    if rank == 0:
        (out / "info.json").write_text(json.dumps(info, indent=2))


# -- tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process and one 2-process launch; each trains every configuration once."""
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("two_procs")
    launch_cpu_processes(Path(__file__), "--out", single, num_processes=1)
    launch_cpu_processes(Path(__file__), "--out", multi, num_processes=2)
    return single, multi


def _load_params(out: Path, run: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / run / "params.safetensors"))


def _assert_same_params(ref: dict, got: dict, atol: float) -> None:
    init = dict(tiny_llama(seed=0).named_parameters())
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    moved = 0.0
    for name, p in ref.items():
        # Adam at lr 5e-2 moves entries by ~0.2 in 4 steps; reduction order across ranks changes the
        # last bits of the gradients, which Adam's normalisation carries into small differences.
        torch.testing.assert_close(got[name], p, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
        moved = max(moved, float((p - init[name].detach()).abs().max()))
    assert moved > 1e-2, "training did not move the parameters; the comparison would be vacuous"


@pytest.mark.distributed
def test_importance_identical_across_ranks_and_equal_to_single_process(runs):
    from hf_softmask import UnitImportance

    single, multi = runs
    ref = UnitImportance.from_pretrained(single / "importance_rank0")
    ranks = [UnitImportance.from_pretrained(multi / f"importance_rank{r}") for r in (0, 1)]
    assert torch.equal(ranks[0].heads, ranks[1].heads) and torch.equal(ranks[0].ffn, ranks[1].ffn)
    torch.testing.assert_close(ranks[0].heads, ref.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(ranks[0].ffn, ref.ffn, atol=1e-5, rtol=0)
    assert ranks[0].meta["tokens"] == ref.meta["tokens"]  # token counts were all-reduced too


@pytest.mark.distributed
def test_importance_of_fsdp2_sharded_model_matches_single_process(runs):
    from hf_softmask import UnitImportance

    single, multi = runs
    ref = UnitImportance.from_pretrained(single / "fsdp2_importance_rank0")
    for r in (0, 1):
        got = UnitImportance.from_pretrained(multi / f"fsdp2_importance_rank{r}")
        torch.testing.assert_close(got.heads, ref.heads, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.ffn, ref.ffn, atol=1e-4, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["update", "grad"])
def test_ddp_trainer_matches_single_process(runs, mode):
    single, multi = runs
    info = json.loads((multi / "info.json").read_text())[f"trainer_{mode}"]
    assert info["world"] == 2 and info["wrapper"] == "DistributedDataParallel", info
    _assert_same_params(_load_params(single, f"trainer_{mode}"), _load_params(multi, f"trainer_{mode}"), atol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["update", "grad"])
def test_fsdp2_dtensor_masking_matches_single_process(runs, mode):
    single, multi = runs
    info = json.loads((multi / "info.json").read_text())[f"fsdp2_{mode}"]
    assert "DTensor" in info["param_types"], info  # really sharded
    _assert_same_params(_load_params(single, f"fsdp2_{mode}"), _load_params(multi, f"fsdp2_{mode}"), atol=1e-4)


@pytest.mark.distributed
def test_update_masking_protects_important_heads_under_ddp(runs):
    """Not vacuous: under DDP the heads with the smallest mask 1 - I moved least (update mode, AdamW)."""
    from hf_softmask import UnitImportance

    single, multi = runs
    imp = UnitImportance.from_pretrained(multi / "importance_rank0")
    params = _load_params(multi, "trainer_update")
    init = dict(tiny_llama(seed=0).named_parameters())
    checked = 0
    for layer in range(imp.heads.shape[0]):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        moved = (params[name] - init[name].detach()).abs().view(imp.heads.shape[1], -1).mean(1)
        mask = 1 - imp.heads[layer]
        lo, hi = int(mask.argmin()), int(mask.argmax())
        if mask[hi] - mask[lo] > 0.3:
            assert moved[lo] < moved[hi], (layer, mask.tolist(), moved.tolist())
            checked += 1
    assert checked > 0


def test_update_masks_for_parameters_the_optimizer_does_not_step_are_refused():
    """DeepSpeed/FSDP1 step flat copies of the parameters; masks keyed by the model's would mask nothing."""
    from hf_softmask import install_update_masks

    model = tiny_llama(seed=0)
    flat = [torch.nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()]))]
    opt = torch.optim.AdamW(flat, lr=1e-3)
    with pytest.raises(ValueError, match="flat parameter copies"):
        install_update_masks(opt, {p: torch.zeros(()) for p in model.parameters()})


@pytest.mark.slow
def test_compiled_masked_adamw_equals_foreach_step():
    """``compile_update=True`` (torch.compile'd fused update) takes the same steps as the foreach path."""
    from hf_softmask import SoftMaskConfig, SoftMasker, UnitImportance, UnitLayout

    results = []
    for compiled in (False, True):
        model = tiny_llama(seed=0)
        layout = UnitLayout.from_model(model)
        g = torch.Generator().manual_seed(0)
        imp = UnitImportance(
            torch.rand(layout.num_layers, layout.num_heads, generator=g),
            torch.rand(layout.num_layers, layout.ffn_size, generator=g),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        masker = SoftMasker(
            model, imp, SoftMaskConfig(mode="update", embeddings="freeze", compile_update=compiled)
        ).attach(opt)
        for i, batch in enumerate(random_lm_batches(n_batches=3, seed=3)):
            if i == 2:
                opt.param_groups[0]["lr"] = 5e-3  # a new learning rate must be honoured (not baked into the graph)
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        masker.detach()
        results.append(dict(model.named_parameters()))
    init = dict(tiny_llama(seed=0).named_parameters())
    torch.testing.assert_close(
        results[1]["model.embed_tokens.weight"], init["model.embed_tokens.weight"], atol=0, rtol=0
    )
    for name, p in results[0].items():
        torch.testing.assert_close(results[1][name], p, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    torch.set_num_threads(1)
    _worker(parser.parse_args().out)
    from hf_softmask.continual import end_processes

    end_processes()
