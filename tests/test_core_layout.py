"""Architecture registry, unit layout and gates on real (tiny) transformers models."""

import pytest
import torch

from hf_softmask import ArchitectureSpec, UnitGates, UnitLayout, UnsupportedModelError, gated, register_architecture
from hf_softmask.core.architectures import _REGISTRY
from tests.testing_utils import TINY_MODELS, VOCAB, random_lm_batches, tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_layout_counts(family):
    model = TINY_MODELS[family]()
    layout = UnitLayout.from_model(model)
    assert layout.num_layers == 2
    assert layout.num_heads == 4
    assert layout.head_dim == 8
    assert layout.ffn_size == (128 if family == "gpt2" else 64)
    assert layout.num_kv_heads == (2 if family == "llama" else 4)
    owned = layout.owned_parameter_ids()
    unowned = [p for ps in layout.unowned_parameters().values() for _, p in ps]
    # Every parameter is either owned by units or in exactly one unowned category.
    assert len(owned) + len(unowned) == len(list(model.parameters()))
    assert not owned & {id(p) for p in unowned}


def test_gpt2_conv1d_slices_follow_transposed_weight():
    model = tiny_gpt2()
    layout = UnitLayout.from_model(model)
    c_attn = next(s for s in layout.owned if s.name.endswith("h.0.attn.c_attn.weight"))
    c_proj = next(s for s in layout.owned if s.name.endswith("h.0.attn.c_proj.weight"))
    c_fc = next(s for s in layout.owned if s.name.endswith("h.0.mlp.c_fc.weight"))
    # Conv1D weight is [in, out]: heads own output COLUMNS of c_attn (in each of the q/k/v thirds)...
    assert c_attn.axis == 1 and c_attn.param.shape == (32, 96)
    assert (
        c_attn.index[:8].tolist() == [0] * 8
        and c_attn.index[32:40].tolist() == [0] * 8
        and c_attn.index[64 + 24 :].tolist() == [3] * 8
    )
    # ...and input ROWS of c_proj; FFN neuron j owns column j of c_fc.
    assert c_proj.axis == 0 and c_fc.axis == 1


def test_bert_heads_own_output_rows_not_input_columns():
    layout = UnitLayout.from_model(tiny_bert())
    q = next(s for s in layout.owned if s.name.endswith("layer.0.attention.self.query.weight"))
    o = next(s for s in layout.owned if s.name.endswith("layer.0.attention.output.dense.weight"))
    assert q.axis == 0 and q.kind == "head"  # the published DAS code used axis 1
    assert o.axis == 1


def test_llama_gqa_kv_heads_take_max_of_sharing_heads():
    layout = UnitLayout.from_model(tiny_llama())
    k = next(s for s in layout.owned if s.name.endswith("layers.0.self_attn.k_proj.weight"))
    assert k.kind == "kv_head" and k.param.shape[0] == 2 * 8
    heads = torch.tensor([[0.1, 0.7, 0.2, 0.3], [0.0, 0.0, 0.9, 0.0]])
    values = layout.unit_values("kv_head", 1, heads, torch.zeros(2, 64))
    assert values.tolist() == pytest.approx([0.0, 0.9])  # HF repeat_kv: kv head g serves heads 2g, 2g+1


def test_unsupported_model_names_supported_types_and_how_to_register():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
        )
    )
    with pytest.raises(UnsupportedModelError) as err:
        UnitLayout.from_model(model)
    msg = str(err.value)
    assert "'opt'" in msg and "bert" in msg and "llama" in msg and "register_architecture" in msg

    # Registration takes module paths as data.
    register_architecture(
        "opt",
        ArchitectureSpec(
            layers="decoder.layers",
            query="self_attn.q_proj",
            key="self_attn.k_proj",
            value="self_attn.v_proj",
            attn_out="self_attn.out_proj",
            ffn_in=("fc1",),
            ffn_out="fc2",
            ffn_size_attr="ffn_dim",
        ),
    )
    try:
        layout = UnitLayout.from_model(model)
        assert (layout.num_layers, layout.num_heads, layout.ffn_size) == (1, 2, 32)
    finally:
        del _REGISTRY["opt"]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gates_at_one_are_identity_and_removable(family, attn):
    model = TINY_MODELS[family](attn_implementation=attn).eval()
    batch = random_lm_batches(1, labels=False)[0]
    ref = model(**batch).logits
    layout = UnitLayout.from_model(model)
    gates = UnitGates.trainable(layout)
    torch.testing.assert_close(model(**batch).logits, ref)
    # Zeroing one head changes the output; zeroing it by gate equals zeroing its o-proj input columns.
    with torch.no_grad():
        gates.head_gate[0, 1] = 0
    gated_out = model(**batch).logits
    assert not torch.allclose(gated_out, ref)
    gates.remove()
    assert all(len(m._forward_pre_hooks) == 0 for m in layout.attn_out_modules + layout.ffn_out_modules)
    torch.testing.assert_close(model(**batch).logits, ref)


def test_head_gate_equals_zeroing_owned_columns():
    model = tiny_bert().eval()
    batch = random_lm_batches(1, labels=False)[0]
    layout = UnitLayout.from_model(model)
    hg = torch.ones(2, 4)
    hg[1, 2] = 0
    fg = torch.ones(2, 64)
    fg[0, 5] = 0
    with gated(model, hg, fg, layout=layout):
        out_gated = model(**batch).logits
    o = layout.attn_out_modules[1]
    down = layout.ffn_out_modules[0]
    with torch.no_grad():
        o.weight[:, 16:24] = 0
        down.weight[:, 5] = 0
    torch.testing.assert_close(model(**batch).logits, out_gated, rtol=1e-5, atol=1e-5)


# Llama's RMSNorm computes in float32 even for a float64 model: a larger step keeps rounding below the tolerance.
@pytest.mark.parametrize("family,eps,rtol", [("bert", 1e-5, 1e-5), ("llama", 1e-3, 5e-3)])
def test_gate_gradient_matches_finite_difference(family, eps, rtol):
    """Gate-based head importance agrees with a brute-force loss change under scaling by 1 +- eps."""
    model = TINY_MODELS[family]().double().eval()
    batch = random_lm_batches(1, seq_len=12, labels=False)[0]
    target = torch.roll(batch["input_ids"], 1, dims=1)

    def loss():
        # Computed here in float64: some models' own loss upcasts to float32 only.
        logits = model(**batch).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))

    layout = UnitLayout.from_model(model)
    gates = UnitGates(
        layout, torch.ones(2, 4, dtype=torch.float64, requires_grad=True), torch.ones(2, 64, dtype=torch.float64)
    )
    loss().backward()
    analytic = gates.head_gate.grad.clone()
    numeric = torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        for l in range(2):
            for h in range(4):
                gates.head_gate[l, h] = 1 + eps
                up = loss()
                gates.head_gate[l, h] = 1 - eps
                down = loss()
                gates.head_gate[l, h] = 1
                numeric[l, h] = (up - down) / (2 * eps)
    gates.remove()
    assert analytic.abs().max() > 1e-6
    torch.testing.assert_close(analytic, numeric, rtol=rtol, atol=rtol * float(analytic.abs().max()))
