"""DAS: the contrastive loss, the importance-gated view, soft-masking through StrategyTrainer, strategy state."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from transformers import default_data_collator

from hf_softmask.core.contrastive import (
    das_contrastive_loss,
    info_nce,
    masked_mean_pool,
    sentence_views,
    unmasked_input_ids,
)
from hf_softmask.core.importance import UnitImportance
from hf_softmask.core.layout import UnitLayout
from hf_softmask.core.masking import SoftMaskConfig
from hf_softmask.strategies import StrategyTrainer, get_strategy
from hf_softmask.strategies.das import DASStrategy
from tests.testing_utils import lm_rows, random_lm_batches, tiny_bert, tiny_llama, train_args


def _importance(layout, value=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if value is None:
        return UnitImportance(
            torch.rand(layout.num_layers, layout.num_heads, generator=g),
            torch.rand(layout.num_layers, layout.ffn_size, generator=g),
        )
    return UnitImportance(
        torch.full((layout.num_layers, layout.num_heads), value),
        torch.full((layout.num_layers, layout.ffn_size), value),
    )


def test_info_nce_identical_views_score_lower_than_random():
    torch.manual_seed(0)
    z1 = torch.randn(8, 16)
    negatives = torch.randn(8, 16)
    same = info_nce(z1, z1.clone(), negatives, temperature=0.05)
    rand = info_nce(z1, torch.randn(8, 16), negatives, temperature=0.05)
    assert same < 0.1 < rand
    # With B positives and N extra negatives, uniform logits give log(B + N).
    flat = info_nce(torch.ones(4, 3), torch.ones(4, 3), torch.ones(2, 3))
    assert flat.item() == pytest.approx(torch.log(torch.tensor(6.0)).item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z1, z1, temperature=0)


def _hand_info_nce(z1, z2, z3, tau):
    """docs/algorithms.md §4 written out.

    Anchor z1[i], positive z2[i], negatives the other z2 and every z3 (own included).
    """
    candidates = list(z2) + list(z3)
    total = 0.0
    for i in range(len(z1)):
        logits = [torch.nn.functional.cosine_similarity(z1[i], c, dim=0).item() / tau for c in candidates]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / len(z1)


def test_info_nce_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    z1, z2, z3 = (torch.randn(3, 5, generator=g) for _ in range(3))
    # z3[0] close to z1[0]: dropping a sample's own z3 from its negatives changes the value a lot
    z3[0] = z1[0] + 0.1 * z3[0]
    expected = _hand_info_nce(z1, z2, z3, 0.05)
    assert info_nce(z1, z2, z3, temperature=0.05).item() == pytest.approx(expected, rel=1e-5)
    # the planted bugs this comparison must catch
    own_z3_excluded = (
        sum(
            torch.nn.functional.cross_entropy(
                (
                    torch.nn.functional.normalize(z1[i : i + 1], dim=-1)
                    @ torch.nn.functional.normalize(torch.cat([z2, z3[torch.arange(3) != i]]), dim=-1).T
                )
                / 0.05,
                torch.tensor([i]),
            ).item()
            for i in range(3)
        )
        / 3
    )
    assert own_z3_excluded != pytest.approx(expected, rel=1e-3)
    wrong_label = info_nce(z1, z3, z2, temperature=0.05).item()  # positive taken from the gated view
    assert wrong_label != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("view_gradients", [True, False])
def test_das_contrastive_loss_matches_hand_computation(view_gradients):
    """The whole term on a real BERT: unmasked input, mask-aware pooling, z3 gated by importance, hand InfoNCE."""
    model = tiny_bert(seed=2).eval()  # no dropout: z1 = z2, both computable by hand
    layout = UnitLayout.from_model(model)
    imp = _importance(layout, seed=3)
    original = random_lm_batches(1, batch_size=3, seq_len=9, seed=6)[0]["input_ids"]
    mask = torch.ones_like(original)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    masked = original.clone()
    masked[:, 1] = 3  # an MLM collator's [MASK]; labels keep the originals
    labels = torch.where(masked != original, original, torch.full_like(original, -100))
    batch = {"input_ids": masked, "attention_mask": mask, "labels": labels}

    def pooled(hidden):
        return torch.stack([hidden[b, mask[b].bool()].mean(0) for b in range(hidden.shape[0])])

    with torch.no_grad():
        z = pooled(model.bert(input_ids=original, attention_mask=mask).last_hidden_state)
        handles = []
        H = layout.num_heads
        for l, layer in enumerate(model.bert.encoder.layer):
            handles.append(
                layer.attention.output.dense.register_forward_pre_hook(
                    lambda m, a, l=l: ((a[0].view(*a[0].shape[:-1], H, -1) * imp.heads[l].view(H, 1)).flatten(-2),)
                )
            )
            handles.append(layer.output.dense.register_forward_pre_hook(lambda m, a, l=l: (a[0] * imp.ffn[l],)))
        z3 = pooled(model.bert(input_ids=original, attention_mask=mask).last_hidden_state)
        for h in handles:
            h.remove()
    expected = _hand_info_nce(z, z, z3, 0.05)
    got = das_contrastive_loss(model, batch, imp, layout, temperature=0.05, view_gradients=view_gradients)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_mean_pool_ignores_padding_and_mlm_labels_restore_input():
    h = torch.arange(12.0).view(1, 4, 3)
    pooled = masked_mean_pool(h, torch.tensor([[1, 1, 0, 0]]))
    assert torch.allclose(pooled, h[0, :2].mean(0))
    ids = torch.tensor([[5, 103, 7]])
    labels = torch.tensor([[-100, 9, -100]])
    assert unmasked_input_ids({"input_ids": ids, "labels": labels}).tolist() == [[5, 9, 7]]


def test_prior_view_z3_differs_from_z1_only_when_importance_gates_units():
    model = tiny_bert().eval()  # dropout off: every difference comes from the gates
    layout = UnitLayout.from_model(model)
    batch = random_lm_batches(1, batch_size=3, seq_len=12)[0]
    z1, z2, z3 = sentence_views(model, batch, _importance(layout), layout)
    assert torch.allclose(z1, z2)
    assert (z1 - z3).abs().max() > 1e-3
    z1, _, z3_ones = sentence_views(model, batch, _importance(layout, 1.0), layout)
    assert torch.allclose(z1, z3_ones, atol=1e-6)


def test_llama_views_get_their_own_perturbation():
    model = tiny_llama().train()  # Llama has no dropout: without the gate dropout both views are equal
    layout = UnitLayout.from_model(model)
    batch = random_lm_batches(1, batch_size=2, seq_len=8)[0]
    z1, z2, _ = sentence_views(model, batch, _importance(layout), layout, perturbation_dropout=0.0)
    assert torch.allclose(z1, z2)
    torch.manual_seed(0)
    z1, z2, _ = sentence_views(model, batch, _importance(layout), layout, perturbation_dropout=0.1)
    assert (z1 - z2).abs().max() > 1e-4


def _parameter_numel_in_memory() -> int:
    gc.collect()
    # type() rather than isinstance(): some module proxies warn when isinstance-checked.
    return sum(o.numel() for o in gc.get_objects() if type(o) is torch.nn.Parameter)


def test_contrastive_loss_needs_no_teacher_copy_and_backpropagates():
    model = tiny_bert().train()
    layout = UnitLayout.from_model(model)
    batch = random_lm_batches(1, batch_size=4, seq_len=12)[0]
    before = _parameter_numel_in_memory()
    loss = das_contrastive_loss(model, batch, _importance(layout), layout, temperature=0.05)
    loss.backward()
    assert _parameter_numel_in_memory() == before
    assert torch.isfinite(loss) and loss.item() > 0
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # no hook survives the views
    assert all(not m._forward_pre_hooks for m in layout.attn_out_modules + layout.ffn_out_modules)


def test_das_strategy_trains_with_soft_mask_and_contrast(tmp_path):
    """Through StrategyTrainer: units of importance 1 do not move (update mode), others do; state round-trips."""
    model = tiny_bert(seed=1)
    strategy = get_strategy("das", softmask=SoftMaskConfig(mode="update"), contrastive_weight=1.0)
    assert isinstance(strategy, DASStrategy) and strategy.changes_effective_lr and "pretrain" in strategy.runners
    loader = random_lm_batches(2, batch_size=4, seq_len=12, seed=3)
    strategy.before_task(model, 0, loader)  # general importance (kl_dropout)
    assert strategy.general_importance is not None and strategy.general_importance.meta["objective"] == "kl_dropout"
    # Protect layer 0 completely, leave layer 1 free.
    heads = strategy.importance.heads.clone()
    ffn = strategy.importance.ffn.clone()
    heads[0], ffn[0], heads[1], ffn[1] = 1.0, 1.0, 0.0, 0.0
    strategy.importance = UnitImportance(heads, ffn)
    q0 = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    q1 = model.bert.encoder.layer[1].attention.self.query.weight.detach().clone()
    args = train_args(tmp_path / "t", max_steps=3, weight_decay=0.0, optim="adamw_torch")
    trainer = StrategyTrainer(
        model=model, args=args, train_dataset=lm_rows(), data_collator=default_data_collator, strategy=strategy
    )
    trainer.train()
    assert len(strategy.contrastive_losses) == 3 and all(v > 0 for v in strategy.contrastive_losses)
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, q0)
    assert not torch.equal(model.bert.encoder.layer[1].attention.self.query.weight, q1)
    strategy.after_task(model, 0, loader)  # domain importance (lm_loss), EMax
    assert len(strategy.domain_importances) == 1
    assert torch.all(strategy.importance.heads >= strategy.domain_importances[0].heads)
    assert torch.all(strategy.importance.heads[0] == 1.0)

    strategy.save_pretrained(tmp_path / "s")
    restored = DASStrategy()
    restored.load_pretrained(tmp_path / "s")
    assert torch.equal(restored.importance.heads, strategy.importance.heads)
    assert torch.equal(restored.general_importance.ffn, strategy.general_importance.ffn)
    assert len(restored.domain_importances) == 1
    assert DASStrategy.saved_config(tmp_path / "s")["contrastive_weight"] == 1.0


def test_das_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature"):
        DASStrategy(temperature=0.0)
    with pytest.raises(ValueError, match="mode"):
        DASStrategy(softmask={"mode": "both"})
    with pytest.raises(RuntimeError, match="before_task"):
        DASStrategy().on_train_begin(tiny_bert(), None)


@pytest.mark.parametrize("view_gradients", [True, False])
def test_views_carry_gradients_only_when_asked(view_gradients):
    model = tiny_bert().train()
    layout = UnitLayout.from_model(model)
    batch = random_lm_batches(1, batch_size=2, seq_len=8)[0]
    z1, z2, z3 = sentence_views(model, batch, _importance(layout), layout, view_gradients=view_gradients)
    assert z1.requires_grad
    assert z2.requires_grad == z3.requires_grad == view_gradients
    assert not torch.allclose(z1, z2)  # independent dropout draws, batched or not
    assert DASStrategy(view_gradients=view_gradients).config()["view_gradients"] == view_gradients


def test_views_of_a_peft_wrapped_model_pool_hidden_states_not_logits():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    layout = UnitLayout.from_model(model.get_base_model())
    batch = random_lm_batches(1, batch_size=2, seq_len=8)[0]
    z1, z2, z3 = sentence_views(model, batch, _importance(layout), layout, perturbation_dropout=0.1)
    assert z1.shape == z2.shape == z3.shape == (2, model.config.hidden_size)
