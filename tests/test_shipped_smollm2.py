"""The core engine on the shipped SmolLM2-135M (Llama family, GQA 9 query / 3 key-value heads)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from hf_softmask import SoftMaskCallback, UnitImportance, UnitLayout, compute_importance
from tests.testing_utils import train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return model, tok


def _batches(tok, n=2):
    from hf_softmask.data import load_bbc_topics

    docs = load_bbc_topics(["tech"])["tech"][: 2 * n]
    enc = tok(docs, truncation=True, max_length=32, padding="max_length", return_tensors="pt")
    rows = [
        {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "labels": enc["input_ids"][i].masked_fill(enc["attention_mask"][i] == 0, -100),
        }
        for i in range(len(docs))
    ]
    return rows


def test_layout_of_smollm2(smollm2):
    model, _ = smollm2
    layout = UnitLayout.from_model(model)
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.ffn_size) == (
        30,
        9,
        3,
        64,
        1536,
    )
    # Tied LM head: it is the embedding matrix, an unowned "embeddings" parameter.
    names = [n for n, _ in layout.unowned_parameters()["embeddings"]]
    assert names == ["model.embed_tokens.weight"]


def test_smollm2_importance_and_exact_protection_of_a_gqa_head(smollm2, tmp_path):
    model, tok = smollm2
    rows = _batches(tok)
    batch = {k: torch.stack([r[k] for r in rows[:2]]) for k in rows[0]}
    imp = compute_importance(model, [batch], "kl_dropout", show_progress=False)  # no dropout: own perturbation
    assert imp.heads.shape == (30, 9) and imp.ffn.shape == (30, 1536) and imp.heads.std() > 0

    layout = UnitLayout.from_model(model)
    protect = UnitImportance.zeros_like_layout(layout)
    protect.heads[3, 4] = 1.0  # query head 4 shares kv-head 1 with heads 3 and 5
    q = model.model.layers[3].self_attn.q_proj.weight
    k = model.model.layers[3].self_attn.k_proj.weight
    o = model.model.layers[3].self_attn.o_proj.weight
    before = (q[256:320].clone(), k[64:128].clone(), o[:, 256:320].clone(), q[0:64].clone())
    args = train_args(tmp_path, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[SoftMaskCallback(protect)]).train()
    assert (
        torch.equal(q[256:320], before[0])
        and torch.equal(k[64:128], before[1])
        and torch.equal(o[:, 256:320], before[2])
    )
    assert not torch.equal(q[0:64], before[3])
