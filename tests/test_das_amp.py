"""Mixed precision under DAS: the contrastive views run under the same autocast as the LM forward.

accelerate puts autocast on the model's top-level ``forward``; the views call the base model directly and would run
(and keep their activations) in fp32 unless DAS re-enters the LM forward's autocast (docs/algorithms.md §8).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import default_data_collator

from hf_softmask.core.importance import UnitImportance
from hf_softmask.core.layout import UnitLayout
from hf_softmask.strategies import StrategyTrainer
from hf_softmask.strategies.das import DASStrategy
from tests.testing_utils import lm_rows, random_lm_batches, tiny_llama, train_args


def _record_linear_dtypes(layout):
    """dtype of every output of the gated projections (o_proj, down_proj), per call."""
    seen = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        for m in layout.attn_out_modules + layout.ffn_out_modules
    ]
    return seen, handles


def test_views_run_under_the_trainers_bf16_autocast(tmp_path):
    model = tiny_llama(seed=3)
    layout = UnitLayout.from_model(model)
    strategy = DASStrategy(show_progress=False)
    g = torch.Generator().manual_seed(0)
    strategy.importance = UnitImportance(
        torch.rand(layout.num_layers, layout.num_heads, generator=g),
        torch.rand(layout.num_layers, layout.ffn_size, generator=g),
    )
    view_dtypes = []
    original = strategy.extra_loss

    def extra_loss(model, inputs, outputs):  # record only what the views compute
        seen, handles = _record_linear_dtypes(layout)
        try:
            return original(model, inputs, outputs)
        finally:
            for h in handles:
                h.remove()
            view_dtypes.extend(seen)

    strategy.extra_loss = extra_loss
    args = train_args(
        tmp_path, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, weight_decay=0.0, bf16=True
    )
    trainer = StrategyTrainer(
        model=model,
        args=args,
        train_dataset=lm_rows(8, seq_len=10, seed=5, batch_size=2),
        data_collator=default_data_collator,
        strategy=strategy,
    )
    trainer.train()
    assert len(strategy.contrastive_losses) == 2 and all(torch.isfinite(torch.tensor(strategy.contrastive_losses)))
    assert view_dtypes, "the views ran no gated projection"
    assert set(view_dtypes) == {torch.bfloat16}, f"views computed in {set(view_dtypes)}"


def test_views_follow_an_enclosing_autocast():
    model = tiny_llama(seed=3).train()
    layout = UnitLayout.from_model(model)
    strategy = DASStrategy(show_progress=False)
    strategy.importance = UnitImportance(
        torch.full((layout.num_layers, layout.num_heads), 0.5), torch.full((layout.num_layers, layout.ffn_size), 0.5)
    )
    batch = random_lm_batches(1, batch_size=2, seq_len=8)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, **strategy.forward_kwargs(model, batch))
        seen, handles = _record_linear_dtypes(layout)
        loss = strategy.extra_loss(model, batch, out)
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_smollm2_das_bf16_with_gradient_checkpointing_keeps_protected_slices(tmp_path):
    """The shipped SmolLM2-135M, StrategyTrainer, bf16 autocast, gradient checkpointing: 2 DAS steps, update mode."""
    from transformers import AutoModelForCausalLM

    from hf_softmask.continual.model_loading import smollm2_checkpoint
    from hf_softmask.core.masking import SoftMaskConfig

    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint())
    layout = UnitLayout.from_model(model)
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(layout.num_layers, layout.num_heads, generator=g) * 0.9
    ffn = torch.rand(layout.num_layers, layout.ffn_size, generator=g) * 0.9
    heads[0], ffn[0] = 1.0, 1.0  # layer 0 fully protected: every slice it owns must stay bit-identical
    strategy = DASStrategy(softmask=SoftMaskConfig(mode="update"), show_progress=False)
    strategy.importance = UnitImportance(heads, ffn)
    protected = {
        n: p.detach().clone() for n, p in model.named_parameters() if ".layers.0." in n and "layernorm" not in n
    }
    free = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers.5.mlp" in n}
    assert len(protected) == 7 and free
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (4, 16), generator=g)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )
    args = train_args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        weight_decay=0.0,
        bf16=True,
        gradient_checkpointing=True,
        optim="adamw_torch",
    )
    trainer = StrategyTrainer(
        model=model, args=args, train_dataset=data, data_collator=default_data_collator, strategy=strategy
    )
    result = trainer.train()
    assert model.model.layers[0].gradient_checkpointing  # the Trainer did checkpoint the layers
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len(strategy.contrastive_losses) == 2 and all(torch.isfinite(torch.tensor(strategy.contrastive_losses)))
    params = dict(model.named_parameters())
    for n, before in protected.items():
        assert torch.equal(params[n].detach(), before), f"{n} moved although its units have importance 1"
    assert any(not torch.equal(params[n].detach(), before) for n, before in free.items())
