"""FSDP2 (torch ``fully_shard``, 2 gloo processes): masks built BEFORE sharding still protect after it.

``fully_shard`` replaces every ``nn.Parameter`` with a DTensor parameter. A SoftMasker or UnitLayout made
before (as DAS makes its layout while computing importance) must resolve its masks by parameter name at
attach (train begin). This file is also the worker the test launches (``accelerate launch``, 2 gloo processes).

Checked per configuration against an unmasked run with the same sharding, data and initialisation, one
optimizer step: a unit of importance 1 does not move; a unit of importance 0.5 moves exactly half as far (update
mode with AdamW; grad mode with SGD, where gradient masking is linear); ``embeddings=freeze`` leaves the
embeddings untouched although their group has weight decay. Further steps keep the protected unit still.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests.test_distributed_masking import _save_params
from tests.testing_utils import launch_cpu_processes, random_lm_batches, tiny_llama

CONFIGS = {  # name -> (mode, embeddings policy, optimizer, built before sharding)
    "update_default": ("update", "train", "adamw", "masker"),
    "update_freeze": ("update", "freeze", "adamw", "masker"),
    "grad_default": ("grad", "train", "sgd", "masker"),
    "grad_freeze": ("grad", "freeze", "sgd", "masker"),
    "update_callback": ("update", "train", "adamw", "callback"),
}
STEPS = 3


def importance_for(layout):
    from hf_softmask import UnitImportance

    imp = UnitImportance.zeros_like_layout(layout)
    imp.heads[1, 2], imp.heads[1, 0] = 1.0, 0.5
    imp.ffn[0, 5], imp.ffn[0, 7] = 1.0, 0.5
    return imp


def _optimizer(model, kind: str):
    embed = [p for n, p in model.named_parameters() if "embed" in n]
    rest = [p for n, p in model.named_parameters() if "embed" not in n]
    # Weight decay only on the embeddings: grad-mode SGD then moves a masked unit by exactly m x the unmasked step,
    # and a frozen embedding that decayed would show.
    groups = [{"params": embed, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2) if kind == "adamw" else torch.optim.SGD(groups, lr=0.5)


def _run(name: str, out: Path, rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    from hf_softmask import SoftMaskCallback, SoftMaskConfig, SoftMasker, UnitLayout

    model = tiny_llama(seed=0)
    layout = UnitLayout.from_model(model)  # before sharding: its parameter objects die in fully_shard
    masker = callback = None
    if name in CONFIGS:
        mode, embeddings, _, built = CONFIGS[name]
        if built == "masker":
            masker = SoftMasker(
                model, importance_for(layout), SoftMaskConfig(mode=mode, embeddings=embeddings), layout=layout
            )
        else:
            callback = SoftMaskCallback(importance_for(layout), mode=mode, embeddings=embeddings)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = _optimizer(
        model, CONFIGS[name][2] if name in CONFIGS else {"unmasked": "adamw", "unmasked_sgd": "sgd"}[name]
    )
    if masker is not None:
        masker.attach(opt)
    if callback is not None:
        callback.on_train_begin(None, None, None, model=model, optimizer=opt)
    batches = random_lm_batches(n_batches=STEPS, batch_size=2 * world, seq_len=12, seed=7)
    for step, batch in enumerate(batches):
        batch = {k: v[rank::world] for k, v in batch.items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            _save_params(model, out / name / "step1.safetensors", rank)
    _save_params(model, out / name / "final.safetensors", rank)
    if masker is not None:
        masker.detach()


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in ("unmasked", "unmasked_sgd", *CONFIGS):
        _run(name, Path(out_dir), rank, world)
        dist.barrier()
    dist.destroy_process_group()


# -- test -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    launch_cpu_processes(Path(__file__), "--out", out)
    return out


def _load(out: Path, name: str, which: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / name / f"{which}.safetensors"))


def _unit(t: torch.Tensor, axis: int, unit: int, size: int) -> torch.Tensor:
    """Entries of ``t`` along ``axis`` that belong to unit ``unit`` (``size`` entries per unit)."""
    return t.narrow(axis, unit * size, size)


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_masks_built_before_fully_shard_protect_after_it(runs, name):
    from hf_softmask import UnitLayout

    _, embeddings, opt_kind, _ = CONFIGS[name]
    init_model = tiny_llama(seed=0)
    layout = UnitLayout.from_model(init_model)
    init = {n: p.detach() for n, p in init_model.named_parameters()}
    ref = _load(runs, "unmasked" if opt_kind == "adamw" else "unmasked_sgd", "step1")
    got, final = _load(runs, name, "step1"), _load(runs, name, "final")
    d = layout.head_dim
    checks = [  # (parameter, axis the units own, entries per unit, unit, mask)
        ("model.layers.1.self_attn.q_proj.weight", 0, d, 2, 0.0),
        ("model.layers.1.self_attn.q_proj.weight", 0, d, 0, 0.5),
        ("model.layers.1.self_attn.o_proj.weight", 1, d, 2, 0.0),
        ("model.layers.1.self_attn.o_proj.weight", 1, d, 0, 0.5),
        ("model.layers.0.mlp.up_proj.weight", 0, 1, 5, 0.0),
        ("model.layers.0.mlp.up_proj.weight", 0, 1, 7, 0.5),
        ("model.layers.0.mlp.down_proj.weight", 1, 1, 5, 0.0),
        ("model.layers.0.mlp.down_proj.weight", 1, 1, 7, 0.5),
    ]
    for pname, axis, size, unit, m in checks:
        d_ref = _unit(ref[pname] - init[pname], axis, unit, size)
        d_got = _unit(got[pname] - init[pname], axis, unit, size)
        assert d_ref.abs().max() > 1e-4, f"{pname}: the unmasked run did not move unit {unit}; vacuous"
        torch.testing.assert_close(d_got, m * d_ref, rtol=1e-4, atol=1e-7, msg=f"{name} {pname} unit {unit}")
        if m == 0:
            assert torch.equal(_unit(final[pname], axis, unit, size), _unit(init[pname], axis, unit, size)), (
                name,
                pname,
            )
    embed = "model.embed_tokens.weight"
    if embeddings == "freeze":
        assert torch.equal(final[embed], init[embed]), f"{name}: frozen embeddings moved"
    else:
        assert not torch.equal(final[embed], init[embed])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    torch.set_num_threads(1)
    _worker(parser.parse_args().out)
    from hf_softmask.continual import end_processes

    end_processes()
