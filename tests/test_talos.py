"""TaLoS: exact sparse trainable set, frozen entries bit-identical under AdamW/SGD with weight decay, task vectors."""

from __future__ import annotations

import pytest
import torch

from hf_softmask.baselines.task_vectors import SparseTaskVector, apply_task_vectors
from hf_softmask.core.optim import MaskedSGD
from hf_softmask.strategies import get_strategy
from hf_softmask.strategies.talos import (
    TaLoSStrategy,
    lowest_fraction_masks,
    scoped_parameters,
)
from tests.testing_utils import lm_dataset, logits_of, random_lm_batches, run_task, tiny_bert, tiny_gpt2


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_frozen_bit_identical(model, before, talos):
    moved = 0
    for name, p in model.named_parameters():
        if name in talos.trainable:
            m = talos.trainable[name]
            assert torch.equal(p.detach()[~m], before[name][~m]), f"frozen entries of {name} moved"
            moved += int((p.detach()[m] != before[name][m]).sum())
        else:
            assert torch.equal(p.detach(), before[name]), f"out-of-scope {name} moved"
    return moved


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_frozen_entries_bit_identical_with_weight_decay(tmp_path, optimizer):
    model = tiny_gpt2()
    talos = get_strategy("talos", keep_fraction=0.2, rounds=3, examples_per_round=8)
    data = lm_dataset(n_batches=4)
    optimizers = (None, None)
    if optimizer == "sgd_momentum":
        optimizers = (MaskedSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1), None)
    before = _snapshot(model)
    trainer = run_task(
        model, talos, data, tmp_path, 0, after=False, optimizers=optimizers, weight_decay=0.1, learning_rate=1e-2
    )
    assert abs(talos.trainable_fraction() - 0.2) < 1e-4
    assert [round(r["keep_fraction"], 4) for r in talos.round_log] == [round(0.2 ** (r / 3), 4) for r in (1, 2, 3)]
    moved = _check_frozen_bit_identical(model, before, talos)
    assert moved > 0.5 * sum(int(m.sum()) for m in talos.trainable.values())  # the trainable entries did train
    if optimizer == "sgd_momentum":
        for name, p in model.named_parameters():
            if name in talos.trainable:
                buf = trainer.optimizer.state[p]["momentum_buffer"]
                assert torch.count_nonzero(buf[~talos.trainable[name]]) == 0


def test_selection_prefers_least_sensitive(tmp_path):
    model = tiny_bert()
    from torch.utils.data import DataLoader

    data = lm_dataset(n_batches=2)
    talos = TaLoSStrategy(keep_fraction=0.3, rounds=2, examples_per_round=8)
    talos.before_task(model, 0, DataLoader(data, batch_size=4))
    # an independent one-round scoring on the same examples: trainable entries are on average far less sensitive
    from hf_softmask.baselines.fisher import fisher_diagonal

    params = scoped_parameters(model)
    scores, _ = fisher_diagonal(model, DataLoader(data, batch_size=4), params, max_examples=8, seed=123)
    kept = torch.cat([scores[n][talos.trainable[n]] for n in params])
    frozen = torch.cat([scores[n][~talos.trainable[n]] for n in params])
    assert kept.mean() < 0.2 * frozen.mean()
    assert "bert.embeddings.word_embeddings.weight" not in talos.trainable  # embeddings are out of the default scope


def test_global_threshold_exact_count_above_2_pow_24():
    n = 2**24 + 1000
    scores = {"a": torch.zeros(n // 2), "b": torch.arange(n - n // 2, dtype=torch.float32)}  # many ties at 0
    masks = lowest_fraction_masks(scores, 12345)
    assert int(masks["a"].sum() + masks["b"].sum()) == 12345
    assert not masks["b"].any()  # all picked among the zero scores


def test_task_vector_arithmetic_and_save_load(tmp_path):
    model = tiny_gpt2()
    theta0 = _snapshot(model)
    talos = TaLoSStrategy(keep_fraction=0.1, rounds=1, examples_per_round=4, task_vector_dir=str(tmp_path / "tv"))
    run_task(model, talos, lm_dataset(n_batches=3), tmp_path / "run", 0, weight_decay=0.1)
    tau = SparseTaskVector.from_pretrained(tmp_path / "tv" / "task_0.safetensors")
    assert tau.num_entries() == sum(int(m.sum()) for m in talos.trainable.values())
    theta_ft = _snapshot(model)
    ev = random_lm_batches(1, seed=9)
    ft_logits = logits_of(model, ev)
    # negation: theta_ft - tau recovers theta_0
    apply_task_vectors(model, [tau], [-1.0])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[n], atol=1e-6, rtol=0)
    # addition: theta_0 + tau recovers the fine-tuned model
    apply_task_vectors(model, [tau], 1.0)
    torch.testing.assert_close(logits_of(model, ev), ft_logits, atol=1e-5, rtol=0)
    # strategy state (bit-packed masks, base values, task vectors) round-trips
    talos.save_pretrained(tmp_path / "ckpt")
    restored = TaLoSStrategy(keep_fraction=0.1, rounds=1)
    restored.load_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(restored.trainable[n], talos.trainable[n]) for n in talos.trainable)
    assert torch.equal(
        restored.task_vectors[0].values["transformer.h.0.mlp.c_fc.weight"],
        tau.values["transformer.h.0.mlp.c_fc.weight"],
    )
    assert set(theta_ft) == set(theta0)


def test_task_vector_loads_the_earlier_int64_index_format(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"w.indices": torch.tensor([1, 4], dtype=torch.int64), "w.values": torch.tensor([0.5, -1.0])},
        str(tmp_path / "old.safetensors"),
        metadata={"shapes": '{"w": [2, 3]}'},
    )
    tv = SparseTaskVector.from_pretrained(tmp_path / "old.safetensors")
    assert tv.masks["w"].dtype == torch.uint8
    assert tv.dense("w").tolist() == [[0.0, 0.5, 0.0], [0.0, -1.0, 0.0]]
