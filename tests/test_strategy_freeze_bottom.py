"""Strategy freeze_bottom: after a real Trainer run (AdamW, weight decay) the bottom k blocks and the embeddings
are bit-identical and everything above moved; a k beyond the model's depth is refused."""

from __future__ import annotations

import pytest
import torch

from hf_softmask.strategies import get_strategy
from hf_softmask.strategies.freeze_bottom import FreezeBottomStrategy
from hf_softmask.strategies.registry import available_strategies
from tests.testing_utils import lm_dataset, run_task, tiny_gpt2, tiny_llama


@pytest.mark.parametrize(
    "make,frozen_prefixes",
    [
        (tiny_llama, ("model.embed_tokens.", "model.layers.0.")),
        # GPT-2 ties the LM head to the token embeddings: it is the same tensor, frozen with them
        (tiny_gpt2, ("transformer.wte.", "transformer.wpe.", "transformer.h.0.", "lm_head.")),
    ],
    ids=["llama", "gpt2-tied"],
)
def test_bottom_layers_bit_identical_upper_layers_moved(tmp_path, make, frozen_prefixes):
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    strategy = get_strategy("freeze_bottom", num_frozen_layers=1, freeze_embeddings=True)
    model = strategy.prepare_model(model)
    trainer = run_task(
        model,
        strategy,
        lm_dataset(seed=0),
        tmp_path,
        0,
        after=False,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_steps=3,
    )
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(frozen_prefixes):
            assert torch.equal(p.detach(), before[name]), name
            assert id(p) not in optimized and not p.requires_grad, name
        else:
            assert not torch.equal(p.detach(), before[name]), f"{name} did not train"
    strategy.after_task(model, 0)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the domain


def test_embeddings_optional_and_too_many_layers_refused():
    model = tiny_llama()
    names = FreezeBottomStrategy(num_frozen_layers=2, freeze_embeddings=False).frozen_names(model)
    assert names and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in names)
    with pytest.raises(ValueError, match="num_frozen_layers=3 but the model has 2 layers; give a value from 0 to 2"):
        FreezeBottomStrategy(num_frozen_layers=3).prepare_model(model)
    with pytest.raises(ValueError, match="freezes nothing"):
        FreezeBottomStrategy(num_frozen_layers=0, freeze_embeddings=False)
    with pytest.raises(TypeError, match=r"unknown FreezeBottomConfig setting\(s\) \['k'\]; valid"):
        get_strategy("freeze_bottom", k=1)
    assert "freeze_bottom" in available_strategies()


def test_upper_layers_train_under_bf16_autocast_and_reentrant_checkpointing(tmp_path):
    """Reentrant checkpointing drops the gradients of a segment whose inputs need none; the first trainable block
    gets its input from frozen ones, so it must still train (and the frozen part stay bit-identical)."""
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = FreezeBottomStrategy(num_frozen_layers=1)
    run_task(
        model,
        strategy,
        lm_dataset(seed=0),
        tmp_path,
        0,
        learning_rate=1e-2,
        max_steps=2,
        bf16=True,
        gradient_accumulation_steps=2,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": True},
    )
    assert model.is_activation_checkpointing
    for name, p in model.named_parameters():
        frozen = name.startswith(("model.embed_tokens.", "model.layers.0."))
        assert torch.equal(p.detach(), before[name]) == frozen, name
