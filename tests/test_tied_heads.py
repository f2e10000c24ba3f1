"""LM heads under the unowned-parameter policies and under TaLoS: a head tied to the input embeddings is one tensor
under two names (the more protective policy holds it, and a warning names both); TaLoS keeps an untied LM head and
BERT's MLM transform frozen, so its sparse task vector is everything the task changed."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import Trainer

from hf_softmask import SoftMaskCallback, SoftMaskConfig, UnitImportance, UnitLayout
from hf_softmask.core.masking import build_named_masks
from hf_softmask.strategies.talos import TaLoSStrategy, lm_head_parameters, scoped_parameters
from tests.testing_utils import (
    ExampleDataset,
    lm_dataset,
    random_lm_batches,
    run_task,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    train_args,
)

TIED = {
    "llama": (lambda: tiny_llama(tie_word_embeddings=True), "model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": (tiny_gpt2, "transformer.wte.weight", "lm_head.weight"),
    "bert": (tiny_bert, "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
}


def _train(model, tmp_path, callback, steps=3):
    """``steps`` AdamW steps of a real Trainer at lr 1e-2, weight decay 0.1."""
    data = ExampleDataset(random_lm_batches(steps, batch_size=4, seq_len=12, seed=3))
    args = train_args(tmp_path, max_steps=steps, lr_scheduler_type="constant")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()


# -- soft-masking policies on a tied head -------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TIED))
@pytest.mark.parametrize("mode", ["update", "grad"])
def test_task_head_freeze_holds_a_head_tied_to_the_embeddings(family, mode, tmp_path, caplog):
    build, embedding, head = TIED[family]
    model = build()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight
    before = tied.detach().clone()
    rest = {n: p.detach().clone() for n, p in model.named_parameters() if p is not tied}  # these do train
    imp = UnitImportance.zeros_like_layout(UnitLayout.from_model(model))
    with caplog.at_level(logging.WARNING, logger="hf_softmask"):
        _train(model, tmp_path, SoftMaskCallback(imp, mode=mode, task_head="freeze", embeddings="train"))
    assert torch.equal(tied.detach(), before), f"tied {head} moved"
    assert any(not torch.equal(p.detach(), rest[n]) for n, p in model.named_parameters() if n in rest)
    said = [r.getMessage() for r in caplog.records if head in r.getMessage() and embedding in r.getMessage()]
    assert len(said) == 1, caplog.text  # once, naming both names
    assert "freeze" in said[0]


def test_embeddings_freeze_holds_the_tied_head_asked_to_train(tmp_path, caplog):
    model = tiny_gpt2()
    wte = model.transformer.wte.weight
    before = wte.detach().clone()
    imp = UnitImportance.zeros_like_layout(UnitLayout.from_model(model))
    with caplog.at_level(logging.WARNING, logger="hf_softmask"):
        _train(model, tmp_path, SoftMaskCallback(imp, embeddings="freeze", task_head="train"))
    assert torch.equal(wte.detach(), before)
    assert "lm_head.weight" in caplog.text and "transformer.wte.weight" in caplog.text


def test_mean_policy_on_a_tied_head_is_the_hand_computed_global_mean():
    """task_head='mean' beside embeddings='train': the shared tensor gets mean(1 - I) over all units."""
    model = tiny_llama(tie_word_embeddings=True)
    layout = UnitLayout.from_model(model)
    imp = UnitImportance.zeros_like_layout(layout)
    g = torch.Generator().manual_seed(0)
    imp.heads.copy_(torch.rand(imp.heads.shape, generator=g))
    imp.ffn.copy_(torch.rand(imp.ffn.shape, generator=g))
    masks = build_named_masks(layout, imp, SoftMaskConfig(task_head="mean"))
    # each layer's mean over its 4 heads and 64 neurons together, then the mean of the 2 layers
    per_layer = [
        (sum(1 - h for h in imp.heads[l].tolist()) + sum(1 - f for f in imp.ffn[l].tolist())) / (4 + 64)
        for l in range(2)
    ]
    expected = sum(per_layer) / 2
    assert masks["model.embed_tokens.weight"].item() == pytest.approx(expected, abs=1e-6)
    assert "lm_head.weight" not in masks  # one entry for the one tensor
    assert "model.norm.weight" not in masks  # norms keep their own policy ('train')


def test_untied_head_keeps_its_own_policy_without_a_warning(tmp_path, caplog):
    model = tiny_llama(tie_word_embeddings=False)
    layout = UnitLayout.from_model(model)
    imp = UnitImportance.zeros_like_layout(layout)
    with caplog.at_level(logging.WARNING, logger="hf_softmask"):
        masks = build_named_masks(layout, imp, SoftMaskConfig(task_head="freeze"))
    assert set(masks) >= {"lm_head.weight"} and "model.embed_tokens.weight" not in masks
    assert "tied" not in caplog.text


# -- TaLoS: the LM head stays frozen ------------------------------------------------------------------------------
def _check_task_vector_is_the_change(model, before, talos):
    """Every parameter's change is exactly the task vector's dense difference (zero where it holds nothing)."""
    tv = talos.task_vectors[0]
    for name, p in model.named_parameters():
        change = p.detach() - before[name]
        expected = tv.dense(name) if name in tv.masks else torch.zeros_like(change)
        assert torch.equal(change, expected.to(change.dtype)), f"{name} changed outside the task vector"
    assert tv.num_entries() > 0


UNTIED = {
    "llama": (lambda: tiny_llama(tie_word_embeddings=False), ["lm_head.weight"]),
    "bert": (
        tiny_bert,
        [
            "cls.predictions.bias",
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias",
        ],
    ),
}


@pytest.mark.parametrize("family", sorted(UNTIED))
def test_talos_keeps_the_lm_head_frozen_and_its_task_vector_covers_every_change(family, tmp_path):
    build, head_names = UNTIED[family]
    model = build()
    assert set(head_names) <= set(lm_head_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    talos = TaLoSStrategy(keep_fraction=0.2, rounds=1, examples_per_round=8)
    run_task(model, talos, lm_dataset(n_batches=3), tmp_path, 0, learning_rate=1e-2, weight_decay=0.1)
    params = dict(model.named_parameters())
    for name in head_names:
        assert name not in talos.trainable
        assert torch.equal(params[name].detach(), before[name]), f"LM head {name} moved under TaLoS"
    _check_task_vector_is_the_change(model, before, talos)


def test_talos_scope_all_keeps_a_tied_head_frozen_with_its_embedding(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.warns(RuntimeWarning, match=r"model\.embed_tokens\.weight.*lm_head\.weight"):
        scoped = scoped_parameters(model, "all")
    assert "model.embed_tokens.weight" not in scoped and "model.norm.weight" in scoped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    talos = TaLoSStrategy(keep_fraction=0.2, rounds=1, examples_per_round=8, scope="all")
    with pytest.warns(RuntimeWarning, match="lm_head.weight"):
        run_task(model, talos, lm_dataset(n_batches=3), tmp_path, 0, learning_rate=1e-2, weight_decay=0.1)
    assert torch.equal(model.lm_head.weight.detach(), before["model.embed_tokens.weight"])
    _check_task_vector_is_the_change(model, before, talos)


def test_a_classifier_is_not_an_lm_head():
    """A sequence classifier (no output embeddings) keeps its head trainable under TaLoS's train_task_head."""
    from transformers import BertForSequenceClassification, BertModel

    assert lm_head_parameters(tiny_bert(model_cls=BertForSequenceClassification)) == {}
    assert lm_head_parameters(tiny_bert(model_cls=BertModel)) == {}
