"""WiSE-FT interpolation equals the hand formula exactly (fp32 and bf16, DTensor shards); the weight EMA equals the
hand recursion over 3 real Trainer steps, is swapped in at the end, and survives a resume."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_softmask.baselines.merging import WeightEMA, interpolate_weights_, snapshot_weights
from tests.testing_utils import lm_dataset, tiny_llama, train_args


def _trained_pair(tmp_path):
    """(model after a real 2-step Trainer run with one frozen parameter, the snapshot taken before it)."""
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)
    before = snapshot_weights(model)
    args = train_args(tmp_path, max_steps=2, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=lm_dataset()).train()
    return model, before


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_interpolation_equals_hand_formula(tmp_path, alpha):
    trained, before = _trained_pair(tmp_path)
    new = {n: p.detach().clone() for n, p in trained.named_parameters()}
    model = copy.deepcopy(trained)
    changed = interpolate_weights_(model, before, alpha)
    assert changed == len(new) - 1  # every parameter except the frozen norm
    for name, p in model.named_parameters():
        want = (alpha * new[name].float() + (1 - alpha) * before[name].float()).to(p.dtype)
        if name == "model.norm.weight":
            want = before[name]  # frozen: untouched, bit for bit
        assert torch.equal(p.detach(), want), name
    if alpha == 0.0:
        assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    if alpha == 1.0:
        assert all(torch.equal(p.detach(), new[n]) for n, p in model.named_parameters())


def test_interpolation_of_bf16_weights_is_computed_in_fp32():
    model = tiny_llama().to(torch.bfloat16)
    before = snapshot_weights(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 1e-2)
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    interpolate_weights_(model, before, 0.3)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), (0.3 * new[name].float() + 0.7 * before[name].float()).to(torch.bfloat16)), name


def test_interpolation_refuses_mismatch_and_bad_alpha():
    model = tiny_llama()
    before = snapshot_weights(model)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_weights_(model, before, 1.5)
    before.pop("lm_head.weight")
    before["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="model-only.*lm_head.weight.*snapshot-only.*extra.weight"):
        interpolate_weights_(model, before, 0.5)


def test_interpolation_on_fsdp2_local_shards(tmp_path):
    """fully_shard (one gloo rank): parameters are DTensors; snapshot and merge use the local shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_llama()
        reference = copy.deepcopy(model)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert all(isinstance(p, DTensor) for p in model.parameters())
        before = snapshot_weights(model)
        assert not any(isinstance(t, DTensor) for t in before.values())
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                p.to_local().add_(1.0)
                q.add_(1.0)
        interpolate_weights_(model, before, 0.25)
        interpolate_weights_(reference, snapshot_weights(tiny_llama()), 0.25)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.to_local(), q.detach()), name
    finally:
        dist.destroy_process_group()


class _Record(TrainerCallback):
    def __init__(self):
        self.after_step = []

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        self.after_step.append({n: p.detach().clone() for n, p in model.named_parameters()})


def test_ema_matches_hand_recursion_over_three_steps(tmp_path):
    decay = 0.6
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    record, ema = _Record(), WeightEMA(decay)
    Trainer(
        model=model,
        args=train_args(tmp_path, max_steps=3, learning_rate=1e-2),
        train_dataset=lm_dataset(),
        callbacks=[record, ema],
    ).train()
    assert len(record.after_step) == 3 and ema.updates == 3
    for name, p in model.named_parameters():
        e = theta0[name]
        for theta_t in record.after_step:
            e = decay * e + (1 - decay) * theta_t[name]
        if name == "lm_head.weight":
            assert torch.equal(p.detach(), theta0[name])  # not trainable: not averaged, untouched
            continue
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
        # the EMA, not the last step, is in place
        assert not torch.equal(p.detach(), record.after_step[-1][name]), name


def test_ema_resumes_from_a_trainer_checkpoint(tmp_path):
    """A run resumed from step 2 ends with the same EMA weights as the uninterrupted run."""
    full = tiny_llama()
    args = {"max_steps": 3, "learning_rate": 1e-2, "save_strategy": "steps", "save_steps": 2}
    Trainer(
        model=full, args=train_args(tmp_path / "a", **args), train_dataset=lm_dataset(), callbacks=[WeightEMA(0.5)]
    ).train()
    assert (tmp_path / "a" / "checkpoint-2" / "ema_weights.safetensors").is_file()
    resumed = tiny_llama()
    Trainer(
        model=resumed, args=train_args(tmp_path / "a", **args), train_dataset=lm_dataset(), callbacks=[WeightEMA(0.5)]
    ).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(1.0)
