"""The estimator axis: every registered estimator on a BERT and a GQA Llama, each checked by hand where feasible."""

import pytest
import torch

from hf_softmask import ImportanceEstimator, UnitLayout, available_estimators, compute_importance, register_estimator
from hf_softmask.core.importance_estimators import _REGISTRY
from tests.testing_utils import random_lm_batches, tiny_bert, tiny_llama

MODELS = {"bert": lambda: tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "llama": tiny_llama}
# Module paths (written out here, not taken from the layout) of the pieces the hand computations read.
PATHS = {
    "bert": dict(
        layers=lambda m: m.bert.encoder.layer,
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
        o="attention.output.dense",
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
    ),
    "llama": dict(
        layers=lambda m: m.model.layers,
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
    ),
}


def _raw(model, batches, estimator, objective="lm_loss", **kw):
    return compute_importance(
        model, batches, objective, estimator=estimator, normalize=False, show_progress=False, **kw
    )


def _padded_batch(seed=0):
    b = random_lm_batches(1, batch_size=3, seq_len=12, seed=seed)[0]
    b["attention_mask"][1, 8:] = 0  # a padded sequence: its pad positions must not count
    b["attention_mask"][2, 5:] = 0
    b["labels"][b["attention_mask"] == 0] = -100
    return b


def _projection_inputs(model, arch, batch):
    """{(layer, part): [input]} of every projection the hand computations read, from one eval forward of
    ``batch`` seen by plain forward pre-hooks."""
    p = PATHS[arch]
    seen, handles = {}, []
    for l, block in enumerate(p["layers"](model)):
        for part in ("q", "k", "v", "o", "ffn_out", *p["ffn_in"]):
            module = block.get_submodule(p.get(part, part))
            handles.append(
                module.register_forward_pre_hook(
                    lambda mod, args, key=(l, part): seen.setdefault(key, []).append(args[0].detach())
                )
            )
    with torch.no_grad():
        model.eval()(**{k: v for k, v in batch.items() if k != "labels"})
    for h in handles:
        h.remove()
    return seen


def test_the_five_estimators_are_listed():
    assert available_estimators() == ["activation", "gate_fisher", "gate_gradient", "random", "wanda"]


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("objective", ["kl_dropout", "lm_loss"])
@pytest.mark.parametrize("estimator", ["activation", "gate_fisher", "gate_gradient", "random", "wanda"])
def test_every_estimator_on_bert_and_gqa_llama(arch, objective, estimator):
    model = MODELS[arch]().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    imp = compute_importance(model, random_lm_batches(2), objective, estimator=estimator, show_progress=False)
    raw = _raw(model, random_lm_batches(2), estimator, objective)
    assert not model.training and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert imp.heads.shape == (2, 4) and imp.ffn.shape == (2, 64)
    assert 0 <= imp.heads.min() and imp.heads.max() <= 1 and 0 <= imp.ffn.min() and imp.ffn.max() <= 1
    assert torch.isfinite(raw.heads).all() and raw.heads.std() > 0 and raw.ffn.std() > 0 and raw.ffn.min() >= 0
    assert imp.meta["estimator"] == estimator and imp.meta["objective"] == objective


@pytest.mark.parametrize("arch", MODELS)
def test_gate_gradient_by_hand(arch):
    """One batch: |d(summed loss)/d gate| / label tokens, the gates multiplied in by hand with forward pre-hooks."""
    model, batch = MODELS[arch](), _padded_batch()
    p = PATHS[arch]
    L, H = len(p["layers"](model)), 4
    gh = torch.ones(L, H, requires_grad=True)
    gf = torch.ones(L, 64, requires_grad=True)
    handles = []
    for l, block in enumerate(p["layers"](model)):
        handles.append(
            block.get_submodule(p["o"]).register_forward_pre_hook(
                lambda m, a, l=l: (a[0] * gh[l].repeat_interleave(a[0].shape[-1] // H),)
            )
        )
        handles.append(block.get_submodule(p["ffn_out"]).register_forward_pre_hook(lambda m, a, l=l: (a[0] * gf[l],)))
    model.train()
    labels = batch["labels"]
    n = int((labels != -100).sum()) if arch == "bert" else int((labels[:, 1:] != -100).sum())
    (model(**batch).loss * n).backward()
    for h in handles:
        h.remove()
    raw = _raw(model, [batch], "gate_gradient")
    torch.testing.assert_close(raw.heads, gh.grad.abs() / n)
    torch.testing.assert_close(raw.ffn, gf.grad.abs() / n)


@pytest.mark.parametrize("arch", MODELS)
def test_gate_fisher_is_the_sum_of_squared_per_sequence_gradients(arch):
    """Fisher of a batch * tokens == sum over its sequences of (that sequence's gate gradient)^2, each sequence's
    gradient from gate_gradient on the sequence alone; with one sequence, fisher == gradient^2 * tokens."""
    model = MODELS[arch]()
    batch = random_lm_batches(1, batch_size=3, seq_len=12, seed=3)[0]
    fisher = _raw(model, [batch], "gate_fisher")
    want_h, want_f = torch.zeros_like(fisher.heads), torch.zeros_like(fisher.ffn)
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        g = _raw(model, [one], "gate_gradient")
        n = g.meta["tokens"]
        want_h += (g.heads.double() * n) ** 2
        want_f += (g.ffn.double() * n) ** 2
        if i == 0:
            f1 = _raw(model, [one], "gate_fisher")
            torch.testing.assert_close(f1.heads, (g.heads.double() ** 2 * n).float(), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(fisher.heads, (want_h / fisher.meta["tokens"]).float(), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(fisher.ffn, (want_f / fisher.meta["tokens"]).float(), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("arch", MODELS)
def test_activation_by_hand_is_mean_abs_unit_output_over_real_tokens(arch):
    model, batch = MODELS[arch](), _padded_batch()
    seen = _projection_inputs(model, arch, batch)
    mask = batch["attention_mask"].bool()
    T = int(mask.sum())
    raw = _raw(model, [batch], "activation", "kl_dropout")
    for l in range(2):
        heads_out = seen[(l, "o")][0][mask]  # [T, H * D]
        want_h = heads_out.abs().view(T, 4, -1).mean(-1).mean(0)
        want_f = seen[(l, "ffn_out")][0][mask].abs().mean(0)
        torch.testing.assert_close(raw.heads[l], want_h)
        torch.testing.assert_close(raw.ffn[l], want_f)
    assert raw.meta["tokens"] == T
    # no loss enters: the objective only names the data, the estimate is the same
    torch.testing.assert_close(_raw(model, [batch], "activation", "lm_loss").heads, raw.heads)


@pytest.mark.parametrize("arch", MODELS)
def test_wanda_by_hand_from_weights_and_input_norms(arch):
    model, batch = MODELS[arch](), _padded_batch()
    p = PATHS[arch]
    seen = _projection_inputs(model, arch, batch)
    mask = batch["attention_mask"].bool()
    H, D = 4, 8
    G = 2 if arch == "llama" else 1  # query heads per key/value head

    def score(l, part):  # |W| * rms of each input feature over real tokens; W is [out, in]
        block = p["layers"](model)[l]
        w = block.get_submodule(p.get(part, part)).weight.detach()
        x = seen[(l, part)][0][mask]
        return w.abs() * x.pow(2).mean(0).sqrt()

    raw = _raw(model, [batch], "wanda")
    for l in range(2):
        q, k, v, o = (score(l, part) for part in ("q", "k", "v", "o"))
        for h in range(H):
            kv = slice((h // G) * D, (h // G + 1) * D)
            want = q[h * D : (h + 1) * D].sum() + (k[kv].sum() + v[kv].sum()) / G + o[:, h * D : (h + 1) * D].sum()
            assert raw.heads[l, h].item() == pytest.approx(want.item(), rel=1e-4)
        want_f = sum(score(l, part).sum(1) for part in p["ffn_in"]) + score(l, "ffn_out").sum(0)
        torch.testing.assert_close(raw.ffn[l], want_f, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", MODELS)
def test_random_keeps_each_layers_values_and_draws_the_assignment_from_the_seed_not_the_data(arch):
    model = MODELS[arch]()
    data_a, data_b = random_lm_batches(2, seed=1), random_lm_batches(2, seed=2)
    base_a, base_b = _raw(model, data_a, "gate_gradient"), _raw(model, data_b, "gate_gradient")
    rand_a, rand_b = _raw(model, data_a, "random"), _raw(model, data_b, "random")
    for base, rand in ((base_a, rand_a), (base_b, rand_b)):
        for x, y in ((base.heads, rand.heads), (base.ffn, rand.ffn)):
            torch.testing.assert_close(x.sort(-1).values, y.sort(-1).values)  # the same multiset in every layer
    assert not torch.equal(rand_a.ffn, base_a.ffn)
    # The permutation found on data A maps data B's estimate to the control's value on B: it ignores the data.
    perm = (base_a.ffn.unsqueeze(-1) == rand_a.ffn.unsqueeze(-2)).float().argmax(1)  # rand[l, j] = base[l, perm[l, j]]
    torch.testing.assert_close(torch.gather(base_b.ffn, 1, perm), rand_b.ffn)
    torch.testing.assert_close(_raw(model, data_a, "random").ffn, rand_a.ffn)  # reproducible
    other = _raw(model, data_a, "random", estimator_options={"seed": 1})
    assert not torch.equal(other.ffn, rand_a.ffn)
    on_wanda = _raw(model, data_a, "random", estimator_options={"base": "wanda"})
    torch.testing.assert_close(on_wanda.ffn.sort(-1).values, _raw(model, data_a, "wanda").ffn.sort(-1).values)
    with pytest.raises(ValueError, match="real estimator"):
        _raw(model, data_a, "random", estimator_options={"base": "random"})


class _OwnedWeightNorm(ImportanceEstimator):
    """A user estimator: each unit's share of its layer's output-projection weight norm (no data needed)."""

    uses_loss = False

    def observe(self, batch, loss_fn):
        return int(batch["input_ids"].numel())

    def result(self, state, tokens):
        heads = torch.stack(
            [
                m.weight.detach().abs().view(m.weight.shape[0], self.layout.num_heads, -1).sum((0, 2))
                for m in self.layout.attn_out_modules
            ]
        )
        ffn = torch.stack([m.weight.detach().abs().sum(0) for m in self.layout.ffn_out_modules])
        return heads, ffn


def test_register_an_estimator_as_data():
    register_estimator("owned_weight_norm", _OwnedWeightNorm)
    try:
        assert "owned_weight_norm" in available_estimators()
        model = tiny_llama()
        raw = _raw(model, random_lm_batches(1), "owned_weight_norm")
        want = model.model.layers[1].mlp.down_proj.weight.detach().abs().sum(0)
        torch.testing.assert_close(raw.ffn[1], want)
        assert raw.meta["estimator"] == "owned_weight_norm"
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("owned_weight_norm", _OwnedWeightNorm)
        with pytest.raises(TypeError, match="ImportanceEstimator subclass"):
            register_estimator("bad", lambda *a: None)
    finally:
        _REGISTRY.pop("owned_weight_norm", None)


def test_unknown_estimator_or_option_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="gate_fisher"):
        compute_importance(tiny_llama(), random_lm_batches(1), "lm_loss", estimator="taylor", show_progress=False)
    with pytest.raises(TypeError, match="seed"):
        compute_importance(
            tiny_llama(),
            random_lm_batches(1),
            "lm_loss",
            estimator="wanda",
            estimator_options={"seed": 1},
            show_progress=False,
        )


def test_layout_is_the_only_view_of_the_model():
    """Estimators read units through the UnitLayout passed in (what a PEFT-aware layout will supply)."""
    model = tiny_llama()
    layout = UnitLayout.from_model(model)
    for name in available_estimators():
        raw = _raw(model, random_lm_batches(1), name, layout=layout)
        assert raw.meta["layout"] == layout.signature()


def test_das_passes_the_estimator_and_normalization_through():
    from hf_softmask import DASStrategy

    das = DASStrategy(estimator="activation", normalization="abs_tanh", show_progress=False)
    model = tiny_llama()
    imp = das.compute_general_importance(model, random_lm_batches(1))
    assert imp.meta["estimator"] == "activation" and imp.meta["normalization"] == "abs_tanh"
    assert das.config()["estimator"] == "activation"
    with pytest.raises(ValueError, match="unknown importance estimator"):
        DASStrategy(estimator="taylor")
    with pytest.raises(ValueError, match="normalization must be one of"):
        DASStrategy(normalization="softmax")
