"""Strategy lora: adapters on the registry's projections; during a domain (real Trainer, AdamW with weight decay)
only the adapter trains and the base weights stay bit-identical; the merge reproduces the adapter model's
outputs in the original, unwrapped model object."""

from __future__ import annotations

import pytest
import torch

from hf_softmask.strategies import get_strategy
from hf_softmask.strategies.lora import LoRAStrategy, lora_target_modules
from hf_softmask.strategies.registry import available_strategies
from tests.testing_utils import (
    lm_dataset,
    logits_of,
    random_lm_batches,
    run_task,
    save_tiny_bert_with_minilm_tokenizer,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    train_args,
)


def test_targets_are_the_registry_projections():
    projections = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    llama = [f"model.layers.{i}.{p}" for i in range(2) for p in projections]
    assert lora_target_modules(tiny_llama(), "all") == llama
    gpt2 = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert lora_target_modules(tiny_gpt2(), "all") == [f"transformer.h.{i}.{p}" for i in range(2) for p in gpt2]
    assert lora_target_modules(tiny_bert(), "ffn") == [
        f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("intermediate.dense", "output.dense")
    ]
    with pytest.raises(ValueError, match="one of"):
        lora_target_modules(tiny_llama(), "mlp")


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_lora_domain_keeps_base_until_merge_and_merge_equals_adapter(tmp_path, make):
    model = make()
    names = [n for n, _ in model.named_parameters()]
    base = {id(p): p.detach().clone() for p in model.parameters()}
    module_types = {n: type(m) for n, m in model.named_modules()}
    ev = random_lm_batches(2, seed=9)
    strategy = get_strategy("lora", lora_rank=4, lora_alpha=8, lora_dropout=0.1)
    trainer = run_task(
        model,
        strategy,
        lm_dataset(seed=0),
        tmp_path / "d0",
        0,
        after=False,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_steps=3,
    )
    adapter = {n: p for n, p in model.named_parameters() if id(p) not in base}
    assert adapter and all(".lora_A.domain0." in n or ".lora_B.domain0." in n for n in adapter)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in adapter.values()}  # only LoRA parameters train
    assert any(float(p.detach().abs().sum()) > 0 for n, p in adapter.items() if ".lora_B." in n)  # ...and they moved
    for p in model.parameters():
        if id(p) in base:
            assert torch.equal(p.detach(), base[id(p)])  # base bit-identical under AdamW + weight decay
    with_adapter = logits_of(model, ev)
    strategy.after_task(model, 0)
    torch.testing.assert_close(logits_of(model, ev), with_adapter, rtol=1e-4, atol=1e-5)
    # the same object, its own modules and parameter names again, all trainable, base weights merged
    assert {n: type(m) for n, m in model.named_modules()} == module_types
    assert [n for n, _ in model.named_parameters()] == names and not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(p.detach(), base[id(p)]) for p in model.parameters())
    # a second domain gets a fresh adapter; its output at the start equals the merged model (B starts at 0)
    merged = logits_of(model, ev)
    strategy.before_task(model, 1)
    assert any(".lora_A.domain1." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits_of(model, ev), merged)
    strategy.after_task(model, 1)
    assert strategy.domains_merged == 2 and strategy.config()["domains_merged"] == 2


def test_merged_model_saves_and_reloads_as_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    strategy = LoRAStrategy(lora_rank=2)
    run_task(model, strategy, lm_dataset(seed=0), tmp_path / "d0", 0, learning_rate=1e-2, max_steps=2)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ev = random_lm_batches(1, seed=3)
    torch.testing.assert_close(logits_of(reloaded, ev), logits_of(model, ev))


def test_lora_settings_validated_and_registered():
    assert "lora" in available_strategies()
    with pytest.raises(TypeError, match=r"unknown LoRABaselineConfig setting\(s\) \['rank'\]; valid: .*lora_rank"):
        get_strategy("lora", rank=4)
    with pytest.raises(ValueError, match="lora_targets"):
        LoRAStrategy(lora_targets="mlp")
    with pytest.raises(ValueError, match="lora_rank"):
        LoRAStrategy(lora_rank=0)
    strategy = LoRAStrategy()
    with pytest.raises(RuntimeError, match="before_task"):
        strategy.after_task(tiny_llama(), 0)
    model = tiny_llama()
    strategy.before_task(model, 0)
    with pytest.raises(ValueError, match="already holds LoRA"):
        LoRAStrategy().before_task(model, 0)


def test_lora_under_bf16_autocast_gradient_checkpointing_and_accumulation(tmp_path):
    """Reentrant checkpointing drops the gradients of a segment whose inputs need none (the base is frozen):
    the adapters must still train, and the base must still stay bit-identical."""
    model = tiny_llama()
    base = {id(p): p.detach().clone() for p in model.parameters()}
    strategy = LoRAStrategy(lora_rank=2)
    run_task(
        model,
        strategy,
        lm_dataset(seed=0),
        tmp_path,
        0,
        after=False,
        learning_rate=1e-2,
        max_steps=2,
        bf16=True,
        gradient_accumulation_steps=2,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": True},
    )
    assert model.is_activation_checkpointing
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert len(lora_b) == 14 and all(float(p.detach().abs().sum()) > 0 for p in lora_b)
    assert all(torch.equal(p.detach(), base[id(p)]) for p in model.parameters() if id(p) in base)
    strategy.after_task(model, 0)


def test_lora_domain_resumes_from_a_trainer_checkpoint(tmp_path):
    """Killed after step 2 of 3: a fresh model + before_task + Trainer resume ends where the uninterrupted run does."""
    from transformers import Trainer

    def domain(resume=None):
        torch.manual_seed(0)  # the adapter's initialisation
        model, strategy = tiny_llama(), LoRAStrategy(lora_rank=2)
        strategy.before_task(model, 0)
        args = train_args(tmp_path / "run", max_steps=3, learning_rate=1e-2, save_strategy="steps", save_steps=2)
        Trainer(model=model, args=args, train_dataset=lm_dataset(seed=0)).train(resume_from_checkpoint=resume)
        strategy.after_task(model, 0)
        return model

    full = domain()
    if (tmp_path / "run" / "checkpoint-3").exists():
        import shutil

        shutil.rmtree(tmp_path / "run" / "checkpoint-3")
    torch.manual_seed(123)  # a different adapter initialisation: the checkpoint must overwrite it
    resumed = domain(resume=str(tmp_path / "run" / "checkpoint-2"))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "strategy,kwargs", [("lora", '{"lora_rank": 4}'), ("freeze_bottom", '{"num_frozen_layers": 1}')]
)
def test_runs_in_todays_pretraining_runner(tmp_path, minilm_dir, strategy, kwargs):
    """The runner of today, unchanged: --strategy lora / freeze_bottom with --strategy_kwargs, two BBC domains with
    mid-domain Trainer checkpoints; every domain directory is a plain checkpoint with the model's own weights."""
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    from hf_softmask.continual import parse_config, run_continual_pretraining

    model_dir = save_tiny_bert_with_minilm_tokenizer(BertForMaskedLM, tmp_path / "m", minilm_dir)
    flags = {
        "model_name_or_path": model_dir,
        "domains": "business,sports",
        "max_train_docs": 12,
        "max_eval_docs": 4,
        "block_size": 32,
        "max_train_blocks": 16,
        "max_eval_blocks": 2,
        "max_steps_per_domain": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "save_steps": 2,
        "logging_steps": 2,
        "num_threads": 1,
        "plots": False,
        "output_dir": tmp_path / "out",
        "strategy": strategy,
        "strategy_kwargs": kwargs,
    }
    res = run_continual_pretraining(parse_config([x for k, v in flags.items() for x in (f"--{k}", str(v))]))
    assert res["complete"] and len(res["loss_matrix"]) == 2
    reference = set(BertForMaskedLM.from_pretrained(model_dir).state_dict())
    for d in ("1_business", "2_sports"):
        reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "out" / d)
        assert set(reloaded.state_dict()) == reference  # no adapter or wrapper left in the saved weights
