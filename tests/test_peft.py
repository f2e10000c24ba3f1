"""Soft-masking and importance on PEFT-wrapped models (LoRA, IA3, modules_to_save) on a tiny BERT and a tiny GQA
Llama built here: the layout is found through the wrapper, importance equals the unwrapped model's, a real Trainer
run keeps the protected units' adapter slices, and adapters whose tensors do not split by unit are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PromptTuningConfig, get_peft_model, inject_adapter_in_model
from torch.utils.data import DataLoader
from transformers import Trainer

from hf_softmask import SoftMaskCallback, UnitImportance, UnitLayout, build_param_masks, compute_importance, gated
from hf_softmask.core.importance_compute import has_dropout
from hf_softmask.core.peft_support import UnsupportedAdapterError
from tests.testing_utils import lm_dataset, random_lm_batches, tiny_bert, tiny_llama, train_args

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_ALL = ["query", "key", "value", "dense"]  # "dense": attention output, intermediate, output (and the MLM head's)


def _lora(family, lora_dropout=0.0, **kw):
    model = tiny_bert(attention_probs_dropout_prob=0.1) if family == "bert" else tiny_llama()
    targets = BERT_ALL if family == "bert" else LLAMA_ALL
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=targets, **kw)
    return get_peft_model(model, cfg)


def _by_name(layout):
    return {s.name: s for s in layout.owned}


# -- layout ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_layout_is_found_through_the_peft_wrapper(family):
    plain = tiny_bert() if family == "bert" else tiny_llama()
    wrapped = _lora(family)
    layout, ref = UnitLayout.from_model(wrapped), UnitLayout.from_model(plain)
    assert layout.signature() == ref.signature()
    assert layout.model_type == family
    # Gates hook the adapter layer (the module at the path), not its base layer.
    assert all(
        type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in layout.attn_out_modules + layout.ffn_out_modules
    )
    owned = _by_name(layout)
    # Every owned tensor of the plain model is owned under its PEFT name (base_layer), with the same axis.
    for s in ref.owned:
        prefix, leaf = s.name.rsplit(".", 1)
        peft_name = f"base_model.model.{prefix}.base_layer.{leaf}"
        assert owned[peft_name].axis == s.axis and torch.equal(owned[peft_name].index, s.index)
    lora = {n: s for n, s in owned.items() if "lora_" in n}
    # Output-side projections own rows of lora_B; input-side ones own columns of lora_A; nothing else.
    assert all(s.axis == (0 if ".lora_B." in n else 1) for n, s in lora.items())
    assert all(s.param.shape[s.axis] == len(s.index) for s in layout.owned)
    per_layer = 6 if family == "bert" else 7  # q, k, v, attention out, FFN in (up and gate for Llama), FFN out
    assert len(lora) == per_layer * layout.num_layers
    names = {n for n, _ in wrapped.named_parameters()}
    for params in layout.unowned_parameters().values():
        for n, _ in params:
            assert n in names
    unowned = {n: cat for cat, ps in layout.unowned_parameters().items() for n, _ in ps}
    # The factor that mixes all units of a projection (lora_A of q/k/v/up/gate, lora_B of o/down) is "other".
    for n in names:
        if "lora_" in n and "layer" in n and n not in owned:
            assert unowned[n] == "other", n
    if family == "bert":  # LoRA on the MLM head's dense layer lies outside the base model: task_head
        assert unowned["base_model.model.cls.predictions.transform.dense.lora_A.default.weight"] == "task_head"


def test_gqa_lora_slices_follow_kv_heads_and_ffn_neurons_by_hand():
    wrapped = _lora("llama")
    layout = UnitLayout.from_model(wrapped)
    D, L = layout.head_dim, layout.num_layers  # 8 = 32 hidden / 4 heads; 2 kv heads
    g = torch.Generator().manual_seed(0)
    imp = UnitImportance(torch.rand(L, 4, generator=g), torch.rand(L, 64, generator=g))
    masks = build_param_masks(layout, imp)
    params = dict(wrapped.named_parameters())
    for l in range(L):
        pre = f"base_model.model.model.layers.{l}."
        h, f = imp.heads[l], imp.ffn[l]
        kv = torch.stack([h[0:2].max(), h[2:4].max()])  # a kv-head is as important as its most important query head
        q_b = masks[params[pre + "self_attn.q_proj.lora_B.default.weight"]]
        k_b = masks[params[pre + "self_attn.k_proj.lora_B.default.weight"]]
        o_a = masks[params[pre + "self_attn.o_proj.lora_A.default.weight"]]
        up_b = masks[params[pre + "mlp.up_proj.lora_B.default.weight"]]
        down_a = masks[params[pre + "mlp.down_proj.lora_A.default.weight"]]
        for r in range(4 * D):
            assert q_b[r, 0] == pytest.approx(1 - h[r // D].item())
            assert o_a[0, r] == pytest.approx(1 - h[r // D].item())
        for r in range(2 * D):
            assert k_b[r, 0] == pytest.approx(1 - kv[r // D].item())
        for j in range(64):
            assert up_b[j, 0] == pytest.approx(1 - f[j].item())
            assert down_a[0, j] == pytest.approx(1 - f[j].item())
        for shared in ("self_attn.q_proj.lora_A", "self_attn.o_proj.lora_B", "mlp.down_proj.lora_B"):
            assert params[pre + shared + ".default.weight"] not in masks  # policy "other" = train by default


def test_gate_scales_the_base_and_the_lora_path_alike():
    wrapped = _lora("llama")
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter: the LoRA path contributes
    layout = UnitLayout.from_model(wrapped)
    outs = {}
    handles = [
        layout.attn_out_modules[0].register_forward_hook(lambda m, a, o: outs.__setitem__("o", o)),
        layout.ffn_out_modules[1].register_forward_hook(lambda m, a, o: outs.__setitem__("down", o)),
    ]
    heads, ffn = torch.ones(2, 4), torch.ones(2, 64)
    heads[0] = 0
    ffn[1] = 0
    ids = random_lm_batches(1, 2, 8)[0]["input_ids"]
    with gated(wrapped, heads, ffn, layout=layout):
        wrapped(input_ids=ids)
    # o_proj / down_proj have no bias: a zero gate on every unit leaves nothing, through W and through B·A.
    assert outs["o"].abs().max() == 0 and outs["down"].abs().max() == 0
    # whereas zeroing the base layer's input only leaves the LoRA path's output
    base_only = layout.attn_out_modules[0].base_layer.register_forward_pre_hook(lambda m, a: (a[0] * 0,))
    wrapped(input_ids=ids)
    base_only.remove()
    for h in handles:
        h.remove()
    assert outs["o"].abs().max() > 0


# -- importance ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["lm_loss", "kl_dropout"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_importance_on_the_wrapped_model_equals_the_unwrapped(family, objective):
    plain = tiny_bert(attention_probs_dropout_prob=0.1) if family == "bert" else tiny_llama()
    wrapped = get_peft_model(
        copy.deepcopy(plain), LoraConfig(r=4, target_modules=BERT_ALL if family == "bert" else LLAMA_ALL)
    )
    batches = random_lm_batches(2, 4, 12, seed=1)
    if family == "bert":  # MLM: labels only on some positions
        for b in batches:
            b["labels"][:, ::2] = -100
    out = []
    for model in (plain, wrapped):
        torch.manual_seed(0)  # same dropout masks in both runs (LoRA B = 0: the adapter changes no value)
        out.append(compute_importance(model, batches, objective, normalize=False, show_progress=False))
    assert out[0].heads.abs().sum() > 0 and out[0].ffn.abs().sum() > 0
    torch.testing.assert_close(out[1].heads, out[0].heads, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out[1].ffn, out[0].ffn, rtol=1e-5, atol=1e-9)
    assert out[1].meta == out[0].meta


def test_lora_dropout_is_not_the_models_dropout():
    """LoRA's dropout acts on a path that is zero at init: kl_dropout must still perturb a Llama (no dropout)."""
    wrapped = _lora("llama", lora_dropout=0.1)
    assert not has_dropout(wrapped)
    imp = compute_importance(wrapped, random_lm_batches(2, 4, 12), "kl_dropout", normalize=False, show_progress=False)
    assert imp.heads.min() > 0 and imp.ffn.min() > 0


def test_importance_saved_for_one_loads_for_the_other(tmp_path):
    plain = tiny_llama()
    wrapped = get_peft_model(copy.deepcopy(plain), LoraConfig(r=4, target_modules=LLAMA_ALL))
    lay_p, lay_w = UnitLayout.from_model(plain), UnitLayout.from_model(wrapped)
    for src, dst, d in ((plain, lay_w, tmp_path / "a"), (wrapped, lay_p, tmp_path / "b")):
        imp = compute_importance(src, random_lm_batches(1, 2, 8), "lm_loss", show_progress=False)
        imp.save_pretrained(d)
        back = UnitImportance.from_pretrained(d, layout=dst)
        assert back.meta["layout"] == dst.signature()
        torch.testing.assert_close(back.heads, imp.heads)


# -- training ------------------------------------------------------------------------------------------------------


def _half_importance(layout):
    """Importance 1 for the first half of the heads and FFN neurons of every layer, 0 for the rest."""
    heads = torch.zeros(layout.num_layers, layout.num_heads)
    ffn = torch.zeros(layout.num_layers, layout.ffn_size)
    heads[:, : layout.num_heads // 2] = 1
    ffn[:, : layout.ffn_size // 2] = 1
    return UnitImportance(heads, ffn)


def _protected(layout, s, imp):
    """Boolean [len(index)]: positions of ``s`` along its axis owned by a unit with importance 1."""
    return (layout.unit_values(s.kind, s.layer, imp.heads, imp.ffn) == 1)[s.index]


def _moved(s, before):
    """Boolean [len(index)]: positions of ``s`` along its axis where any entry changed since ``before``."""
    return (s.param.detach() != before[s.name]).movedim(s.axis, 0).reshape(len(s.index), -1).any(1)


def _train_and_check(model, tmp_path, **args):
    layout = UnitLayout.from_model(model)
    imp = _half_importance(layout)
    trainable = [s for s in layout.owned if s.param.requires_grad]
    assert trainable, "the adapter owns no trainable slice"
    before = {s.name: s.param.detach().clone() for s in trainable}
    kw = {"max_steps": 4, "learning_rate": 1e-2, "weight_decay": 0.1, **args}
    trainer = Trainer(
        model=model,
        args=train_args(tmp_path, **kw),
        train_dataset=lm_dataset(4, 4, 12),
        callbacks=[SoftMaskCallback(imp, mode="update")],
    )
    trainer.train()
    for s in trainable:
        prot = _protected(layout, s, imp)
        moved = _moved(s, before)
        assert not moved[prot].any(), f"{s.name}: protected units moved"
        assert moved[~prot].all(), f"{s.name}: unprotected units did not move"
    return layout


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_trainer_with_softmask_callback_keeps_protected_lora_slices(family, tmp_path):
    _train_and_check(_lora(family, lora_dropout=0.1), tmp_path)


def test_lora_on_some_layers_and_modules_to_save(tmp_path):
    """LoRA on layer 1's q/v only, o_proj and lm_head as trainable copies (modules_to_save)."""
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], modules_to_save=["o_proj", "lm_head"]
        ),
    )
    layout = _train_and_check(model, tmp_path)
    owned = _by_name(layout)
    copies = [n for n in owned if ".o_proj.modules_to_save.default.weight" in n]
    assert len(copies) == 2 and all(owned[n].axis == 1 for n in copies)
    assert not any("layers.0" in n and "lora_" in n for n in owned)
    head = {n for n, _ in layout.unowned_parameters()["task_head"]}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in head


def test_ia3_vectors_are_owned_by_their_units(tmp_path):
    model = get_peft_model(
        tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    layout = _train_and_check(model, tmp_path, learning_rate=5e-2)
    ia3 = {n: s for n, s in _by_name(layout).items() if "ia3_l" in n}
    assert {(s.kind, s.axis) for s in ia3.values()} == {("kv_head", 0), ("ffn", 1)}


def test_adapters_injected_into_a_plain_transformers_model(tmp_path):
    """No PeftModel around: LoRA layers injected in place (as transformers' add_adapter does)."""
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=LLAMA_ALL), tiny_llama())
    _train_and_check(model, tmp_path)


# -- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, match",
    [
        (LoraConfig(r=4, target_modules=LLAMA_ALL, use_dora=True), "DoRA"),
        (LoHaConfig(r=4, target_modules=LLAMA_ALL), "LOHA"),
        (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "PROMPT_TUNING"),
    ],
)
def test_adapters_without_unit_slices_are_refused_at_train_begin(config, match, tmp_path):
    model = get_peft_model(tiny_llama(), config)
    with pytest.raises(UnsupportedAdapterError, match=match):
        UnitLayout.from_model(model)
    imp = UnitImportance(torch.ones(2, 4), torch.ones(2, 64))
    trainer = Trainer(
        model=model,
        args=train_args(tmp_path, max_steps=1),
        train_dataset=lm_dataset(1, 4, 12),
        callbacks=[SoftMaskCallback(imp)],
    )
    with pytest.raises(UnsupportedAdapterError, match=match):
        trainer.train()


def test_injected_dora_layers_are_refused():
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["o_proj"], use_dora=True), tiny_llama())
    with pytest.raises(UnsupportedAdapterError, match="variant"):
        UnitLayout.from_model(model)


def test_importance_dataloader_on_wrapped_model(tmp_path):
    """compute_importance takes a DataLoader of the Trainer's examples on the wrapped model as on the plain one."""
    wrapped = _lora("llama")
    loader = DataLoader(lm_dataset(2, 4, 12), batch_size=4)
    imp = compute_importance(wrapped, loader, "lm_loss", show_progress=False)
    imp.validate_for(UnitLayout.from_model(wrapped))


def test_adapters_that_train_no_unit_are_refused_at_train_begin(tmp_path):
    """LoRA on lm_head only: every unit is frozen, soft-masking could protect nothing; importance still works."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["lm_head"]))
    compute_importance(model, random_lm_batches(1, 2, 8), "lm_loss", show_progress=False)
    imp = UnitImportance(torch.ones(2, 4), torch.ones(2, 64))
    for mode in ("update", "grad"):
        trainer = Trainer(
            model=model,
            args=train_args(tmp_path, max_steps=1),
            train_dataset=lm_dataset(1, 4, 12),
            callbacks=[SoftMaskCallback(imp, mode=mode)],
        )
        with pytest.raises(UnsupportedAdapterError, match="lm_head.lora_A"):
            trainer.train()


def test_adapters_on_unowned_layers_take_the_category_of_the_layer_they_adapt():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens", "lm_head"]))
    unowned = {n: cat for cat, ps in UnitLayout.from_model(model).unowned_parameters().items() for n, _ in ps}
    assert unowned["base_model.model.model.embed_tokens.lora_embedding_A.default"] == "embeddings"
    assert unowned["base_model.model.model.embed_tokens.base_layer.weight"] == "embeddings"
    assert unowned["base_model.model.lm_head.lora_B.default.weight"] == "task_head"


def test_das_strategy_on_a_lora_model_keeps_protected_lora_slices(tmp_path):
    """DASStrategy through StrategyTrainer on a LoRA-wrapped Llama: contrastive views run, protection holds."""
    from hf_softmask.strategies.base import StrategyTrainer
    from hf_softmask.strategies.das import DASStrategy

    model = _lora("llama")
    layout = UnitLayout.from_model(model)
    strategy = DASStrategy(show_progress=False, importance_batches=2)
    data = lm_dataset(2, 4, 12)
    strategy.before_task(model, 0, DataLoader(data, batch_size=4))
    strategy.importance = strategy.importance.maximum(_half_importance(layout))
    imp = strategy.importance
    trainable = [s for s in layout.owned if s.param.requires_grad]
    before = {s.name: s.param.detach().clone() for s in trainable}
    StrategyTrainer(
        model=model, args=train_args(tmp_path, max_steps=4, learning_rate=1e-2), train_dataset=data, strategy=strategy
    ).train()
    assert strategy.contrastive_losses and all(torch.isfinite(torch.tensor(strategy.contrastive_losses)))
    for s in trainable:
        prot = _protected(layout, s, imp)
        moved = _moved(s, before)
        assert not moved[prot].any(), s.name
        assert moved[~prot].any(), s.name


def test_softmask_trainer_on_a_lora_model_saves_adapter_and_importance(tmp_path):
    from hf_softmask import SoftMaskTrainer, SoftMaskTrainingArguments

    model = _lora("bert")
    layout = UnitLayout.from_model(model)
    imp = _half_importance(layout)
    imp.save_pretrained(tmp_path / "imp")
    q_b = next(s for s in layout.owned if s.name.endswith("layer.0.attention.self.query.lora_B.default.weight"))
    args = SoftMaskTrainingArguments(
        output_dir=str(tmp_path / "out"),
        importance_path=str(tmp_path / "imp"),
        max_steps=3,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="steps",
        save_steps=3,
        use_cpu=True,
        disable_tqdm=True,
    )
    SoftMaskTrainer(model=model, args=args, train_dataset=lm_dataset(2, 4, 12)).train()
    ckpt = tmp_path / "out" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and UnitImportance.exists(ckpt)
    prot = _protected(layout, q_b, imp)
    assert q_b.param[prot].abs().max() == 0 and q_b.param[~prot].abs().max() > 0  # B rows start at 0
