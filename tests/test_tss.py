"""TSS: scored layers as a PEFT tuner, per-task subnetworks, soft-masked scores, bit-packed storage."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hf_softmask.core.bitpack import pack_bits, packed_nbytes, unpack_bits
from hf_softmask.strategies import get_strategy
from hf_softmask.task_heads import MultiTaskClassifier
from hf_softmask.tss import SubnetworkConfig, SubnetworkModel, get_subnetwork_model, straight_through_mask
from hf_softmask.tss.layer import SubnetworkLinear
from tests.testing_utils import (
    batch_of,
    logits,
    one_thread,
    task_dataset,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    train_task,
)

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

BACKBONES = {
    "bert": lambda: tiny_bert().bert,
    "gpt2": lambda: tiny_gpt2().transformer,
    "llama": lambda: tiny_llama().model,
}


def tss_classifier(kind="bert", num_labels=(2, 3), **strategy_kw):
    strategy = get_strategy("tss", **strategy_kw)
    model = strategy.prepare_model(MultiTaskClassifier(BACKBONES[kind](), list(num_labels)))
    return model, strategy


def test_bitpack_round_trip_and_size():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (8, 8), (1,), (7, 13, 2)]:
        mask = torch.rand(shape, generator=g) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8) == packed_nbytes(
            mask.numel()
        )
        assert torch.equal(unpack_bits(packed, shape), mask)
    # MSB first, like numpy.packbits
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1])).tolist() == [129]
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_bits(packed, (100,))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_initial_subnetwork_is_the_pretrained_model(kind):
    base = BACKBONES[kind]().eval()
    tuner = get_subnetwork_model(BACKBONES[kind](), SubnetworkConfig()).eval()
    layers = tuner.subnetwork_layers()
    assert layers and all(isinstance(m, SubnetworkLinear) for m in layers.values())
    if kind == "gpt2":  # Conv1D weight is [in, out]: the layer must know it
        assert all(m.is_conv1d for m in layers.values())
    x = torch.randint(1, 100, (2, 10))
    assert torch.equal(base(input_ids=x).last_hidden_state, tuner(input_ids=x).last_hidden_state)
    trainable = {n for n, p in tuner.named_parameters() if p.requires_grad}
    assert trainable and all(".subnet_scores." in n for n in trainable)


def test_threshold_below_init_is_rejected():
    with pytest.raises(ValueError, match="init_score"):
        SubnetworkConfig(threshold=0.5, init_score=0.1)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_straight_through_gradient_reaches_scores(kind):
    tuner = get_subnetwork_model(BACKBONES[kind](), SubnetworkConfig())
    name, layer = next(iter(tuner.subnetwork_layers().items()))
    W = layer.get_base_layer().weight
    x = torch.randn(3, W.shape[1] if not layer.is_conv1d else W.shape[0], requires_grad=False)
    g = torch.randn(3, W.shape[0] if not layer.is_conv1d else W.shape[1])
    (layer(x) * g).sum().backward()
    # d/ds of x (W * mask)^T with a straight-through mask is d/dW_eff * W; for nn.Linear d/dW_eff = g^T x.
    dW_eff = g.t() @ x if not layer.is_conv1d else x.t() @ g
    assert torch.allclose(layer.subnet_scores["default"].grad, dW_eff * W, atol=1e-5)
    assert W.grad is None


def test_straight_through_mask_function():
    s = torch.tensor([[-1.0, 0.0, 2.0, 0.5]], requires_grad=True)
    m = straight_through_mask(s, "threshold", 0.0)
    assert m.tolist() == [[0.0, 1.0, 1.0, 1.0]]
    (m * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert s.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """A TSS classifier trained on task 0 then task 1, with the logits recorded along the way."""
    tmp = tmp_path_factory.mktemp("tss")
    model, strategy = tss_classifier("bert")
    d0, d1 = task_dataset(0), task_dataset(1, num_labels=3)
    b0, b1 = batch_of(d0), batch_of(d1)
    train_task(model, strategy, d0, 0, tmp)
    rec = {
        "after_task1": logits(model, b0),
        "task2_before": logits(model, b1),
        "importance": {n: v.clone() for n, v in model.backbone.importance().items()},
        "scores_before": {n: p.detach().clone() for n, p in model.backbone.score_parameters().items()},
    }
    train_task(model, strategy, d1, 1, tmp)
    return model, strategy, d0, d1, rec


def test_task1_outputs_bit_identical_after_task2(two_tasks):
    model, strategy, d0, d1, rec = two_tasks
    assert torch.equal(logits(model, batch_of(d0)), rec["after_task1"])
    # ... while task 2 really trained: its scores moved and its outputs changed
    moved = sum(
        int((p.detach() != rec["scores_before"][n]).sum()) for n, p in model.backbone.score_parameters().items()
    )
    assert moved > 0
    assert not torch.equal(logits(model, batch_of(d1)), rec["task2_before"])
    assert model.backbone.finished_tasks() == [0, 1]


def test_importance_is_tanh_normalized_per_row(two_tasks):
    model, _, _, _, rec = two_tasks
    for name, imp in rec["importance"].items():
        assert imp.min() >= 0 and imp.max() <= 1, name  # so 1 - I stays in [0, 1] (the seed notebook's bug)
        assert imp.max() > 0.5, name
    for name, acc in model.backbone.importance().items():  # EMax: never below the first task's importance
        assert (acc >= rec["importance"][name]).all(), name


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_soft_mask_freezes_scores_with_importance_one(tmp_path, mode):
    model, strategy = tss_classifier("bert", mode=mode)
    train_task(model, strategy, task_dataset(0), 0, tmp_path)
    tuner = model.backbone
    protected = {}
    g = torch.Generator().manual_seed(0)
    for name, imp in tuner.importance().items():
        # Force a known pattern: half the entries fully important, the rest not at all.
        pattern = torch.rand(imp.shape, generator=g) < 0.5
        imp.copy_(pattern.float())
        protected[name] = pattern
    before = {n: p.detach().clone() for n, p in tuner.score_parameters().items()}
    train_task(model, strategy, task_dataset(1, num_labels=3), 1, tmp_path)
    free_moved = 0
    for name, p in tuner.score_parameters().items():
        assert torch.equal(p.detach()[protected[name]], before[name][protected[name]]), name
        free_moved += int((p.detach()[~protected[name]] != before[name][~protected[name]]).sum())
    assert free_moved > 0
    assert strategy._handle is None and strategy._hooks is None  # masking is removed after the task


def test_mixed_task_batch_equals_per_task_batches(two_tasks):
    model, _, d0, d1, _ = two_tasks
    b0, b1 = batch_of(d0, 4), batch_of(d1, 4)
    mixed = {k: torch.cat([b0[k][:2], b1[k][:3], b0[k][2:], b1[k][3:]]) for k in b0}
    out = logits(model, mixed)
    l0, l1 = logits(model, b0), logits(model, b1)
    assert out.shape == (8, 3)
    torch.testing.assert_close(out[[0, 1, 5, 6], :2], l0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[[2, 3, 4, 7]], l1, rtol=0, atol=1e-6)
    assert torch.isinf(out[[0, 1, 5, 6], 2]).all()  # task 0 has 2 classes: the padded logit is -inf
    assert model.current_task == 1 and model.backbone.task == 1  # grouping does not change the selected task


def _check_round_trip(model, strategy, batches, save, fresh_backbone):
    want = [logits(model, b) for b in batches]
    strategy.save_model(model, save)
    model.save_heads(save)
    cfg = json.loads((save / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SUBNETWORK" and cfg["selection"] == strategy.adapter_config.selection
    assert SubnetworkConfig.from_pretrained(str(save)).to_dict() == strategy.adapter_config.to_dict()
    tensors = load_file(str(save / "adapter_model.safetensors"))
    masks = {k: v for k, v in tensors.items() if ".subnet_masks." in k}
    assert masks and all(v.dtype == torch.uint8 for v in masks.values())

    restored = SubnetworkModel.from_pretrained(fresh_backbone, save)  # a fresh copy of the same base model
    assert restored.finished_tasks() == list(range(len(batches)))
    clf = MultiTaskClassifier.from_pretrained_heads(restored, save)
    for b, w in zip(batches, want):
        assert torch.equal(logits(clf, b), w)
    assert not any(p.requires_grad for p in clf.backbone.parameters())


def test_save_load_restores_every_subnetwork(two_tasks, tmp_path):
    model, strategy, d0, d1, _ = two_tasks
    _check_round_trip(model, strategy, [batch_of(d0), batch_of(d1)], tmp_path / "adapter", BACKBONES["bert"]())


def test_conv1d_gpt2_subnetworks_persist_and_round_trip(tmp_path):
    model, strategy = tss_classifier("gpt2")
    d0, d1 = task_dataset(0, n=16), task_dataset(1, n=16, num_labels=3)
    train_task(model, strategy, d0, 0, tmp_path)
    first = logits(model, batch_of(d0))
    train_task(model, strategy, d1, 1, tmp_path)
    assert torch.equal(logits(model, batch_of(d0)), first)
    _check_round_trip(model, strategy, [batch_of(d0), batch_of(d1)], tmp_path / "adapter", BACKBONES["gpt2"]())


def test_storage_is_one_bit_per_weight(two_tasks):
    model, strategy, *_ = two_tasks
    tuner = model.backbone
    n = tuner.num_scored_weights()
    for t in (0, 1):
        assert (
            strategy.storage_bytes[t]
            == tuner.storage_bytes(t)
            == sum(packed_nbytes(l.get_base_layer().weight.numel()) for l in tuner.subnetwork_layers().values())
        )
        assert n / 8 <= strategy.storage_bytes[t] <= n / 8 + len(tuner.subnetwork_layers())


def test_unsupported_target_module_names_the_fix():
    with pytest.raises(TypeError, match="nn.Linear and Conv1D"):
        get_subnetwork_model(tiny_bert().bert, SubnetworkConfig(target_modules=["LayerNorm"]))
