"""WSN: top-c% subnetworks per task with trainable weights; weights used by earlier tasks never move."""

from __future__ import annotations

import pytest
import torch

from hf_softmask.strategies import get_strategy
from hf_softmask.task_heads import MultiTaskClassifier
from hf_softmask.tss import SubnetworkModel, straight_through_mask, topk_mask
from tests.testing_utils import batch_of, logits, one_thread, task_dataset, tiny_bert, train_task

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_topk_mask_above_quantile_limit():
    n = 2**24 + 1  # torch.quantile refuses inputs this large
    scores = torch.randn(n, generator=torch.Generator().manual_seed(0))
    mask = topk_mask(scores, 0.3)
    k = round(0.3 * n)
    assert int(mask.sum()) == k
    assert scores[mask].min() >= scores[~mask].max()


def test_topk_mask_breaks_ties_exactly():
    mask = topk_mask(torch.zeros(4, 5), 0.5)
    assert int(mask.sum()) == 10
    with pytest.raises(ValueError, match="keep_ratio"):
        topk_mask(torch.zeros(3), 0.0)


def test_topk_straight_through_gives_each_input_its_gradient():
    scores = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    upstream = torch.randn(6, 4)
    m = straight_through_mask(scores, "topk", 0.25)
    ((weight * m) * upstream).sum().backward()  # CLArena's version crashes here (one gradient for two inputs)
    assert int(m.sum()) == 6
    assert torch.equal(scores.grad, upstream * weight.detach())
    assert torch.equal(weight.grad, upstream * m.detach())


@pytest.fixture(scope="module")
def wsn_two_tasks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wsn")
    strategy = get_strategy("wsn", keep_ratio=0.5)
    model = strategy.prepare_model(MultiTaskClassifier(tiny_bert().bert, [2, 3]))
    d0, d1 = task_dataset(0), task_dataset(1, num_labels=3)
    train_task(model, strategy, d0, 0, tmp, learning_rate=1e-2)
    rec = {
        "after_task1": logits(model, batch_of(d0)),
        "weights": {
            n: l.get_base_layer().weight.detach().clone() for n, l in model.backbone.subnetwork_layers().items()
        },
        "used": {n: m.clone() for n, m in model.backbone.task_masks(0).items()},
    }
    train_task(model, strategy, d1, 1, tmp, learning_rate=1e-2)
    return model, strategy, d0, d1, rec


def test_earlier_task_outputs_identical_after_later_tasks(wsn_two_tasks):
    model, _, d0, _, rec = wsn_two_tasks
    assert torch.equal(logits(model, batch_of(d0)), rec["after_task1"])


def test_weights_of_earlier_tasks_get_zero_update(wsn_two_tasks):
    model, strategy, *_, rec = wsn_two_tasks
    moved_free = 0
    for name, layer in model.backbone.subnetwork_layers().items():
        w = layer.get_base_layer().weight.detach()
        used = rec["used"][name]
        assert torch.equal(w[used], rec["weights"][name][used]), name
        moved_free += int((w[~used] != rec["weights"][name][~used]).sum())
    assert moved_free > 0  # task 2 trained the weights task 1 left free
    assert strategy._handle is None


def test_each_task_keeps_exactly_c_percent_per_layer(wsn_two_tasks):
    model, strategy, *_ = wsn_two_tasks
    for t in (0, 1):
        for name, m in model.backbone.task_masks(t).items():
            assert int(m.sum()) == round(0.5 * m.numel()), (t, name)
        assert strategy.mask_density[t] == pytest.approx(0.5, abs=1e-3)
    assert strategy.storage_bytes[0] == sum((m.numel() + 7) // 8 for m in model.backbone.task_masks(0).values())


def test_wsn_round_trip_restores_trained_weights_and_masks(wsn_two_tasks, tmp_path):
    model, strategy, d0, d1, _ = wsn_two_tasks
    want = [logits(model, batch_of(d)) for d in (d0, d1)]
    strategy.save_model(model, tmp_path)
    model.save_heads(tmp_path)
    clf = MultiTaskClassifier.from_pretrained_heads(
        SubnetworkModel.from_pretrained(tiny_bert().bert, tmp_path), tmp_path
    )
    for d, w in zip((d0, d1), want):
        assert torch.equal(logits(clf, batch_of(d)), w)


def test_wsn_rejects_a_threshold_config():
    from hf_softmask.tss import SubnetworkConfig

    with pytest.raises(ValueError, match="topk"):
        get_strategy("wsn", adapter_config=SubnetworkConfig(selection="threshold"))
