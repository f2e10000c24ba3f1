"""Where hf_softmask follows the published DAS code (ContinualLM) exactly, and where it departs on purpose.

Reference read 2026-12-06 (github.com/UIC-Liu-Lab/ContinualLM, files at the commits named):
- ``networks/baselines/softmask.py`` @ 26b4083a7842: ``impt_norm`` -- for each layer ``(x - x.mean()) / x.std()``
  (``torch.std``: unbiased), then ``tanh``, then ``abs``; ``compute_impt`` adds ``head_mask.grad`` (signed, no
  ``abs``) per batch and divides by the tokens; ``soft_mask_gradient`` masks heads, intermediate units and output
  units (``output.dense`` rows and bias).
- ``networks/transformers/roberta.py`` @ 26b4083a7842: ``MyRobertaIntermediate`` multiplies ``dense(x)`` by
  ``intermediate_mask`` BEFORE the activation; ``MyRobertaOutput`` multiplies ``output.dense``'s output by
  ``output_mask``.
- ``utils/model.py`` @ 3b2c44bb7550: ``DistillKL`` takes ``softmax(dim=1)`` of ``[B, T, D]`` hidden states (the
  sequence axis).
- ``networks/posttrain/model.py`` @ 3b2c44bb7550: DAS views ``inputs_ori_ids.repeat(2, 1)`` then
  ``.view(-1, 2, T, D)``, so ``z1[i]``/``z2[i]`` are rows ``2i``/``2i+1``: different sequences.

Each test pins one convention on a tiny BERT (docs/algorithms.md §9 lists each, its reason and its setting).
"""

import pytest
import torch

from hf_softmask import compute_importance
from hf_softmask.core.contrastive import masked_mean_pool, sentence_views
from hf_softmask.core.gates import gated
from hf_softmask.core.importance import UnitImportance
from hf_softmask.core.importance_compute import OBJECTIVES
from hf_softmask.core.layout import UnitLayout
from hf_softmask.strategies.das import DASConfig, DASStrategy
from tests.testing_utils import random_lm_batches, tiny_bert, tiny_llama


def _reference_impt_norm(impt: torch.Tensor) -> torch.Tensor:
    """ContinualLM's ``impt_norm`` written out: per layer ``|tanh((x - mean) / std)|``, ``std`` unbiased (n - 1)."""
    out = torch.empty_like(impt)
    for layer in range(impt.shape[0]):
        x = impt[layer].double()
        n = x.numel()
        mean = x.sum() / n
        std = ((x - mean).pow(2).sum() / (n - 1)).sqrt()
        out[layer] = torch.tanh((x - mean) / std).abs().to(out.dtype)
    return out


def _raw_importance(model=None, objective="lm_loss", **kw):
    model = model or tiny_bert()
    return compute_importance(model, random_lm_batches(3), objective, normalize=False, show_progress=False, **kw)


# -- normalization -----------------------------------------------------------------------------------------------
def test_abs_tanh_is_the_reference_impt_norm():
    """``abs_tanh`` = ContinualLM ``impt_norm`` to 1e-6 (4 heads a layer: the population std differs by ~0.06)."""
    raw = _raw_importance()
    got = raw.normalized("abs_tanh")
    torch.testing.assert_close(got.heads, _reference_impt_norm(raw.heads), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.ffn, _reference_impt_norm(raw.ffn), rtol=0, atol=1e-6)


# -- |.| of the gate gradient --------------------------------------------------------------------------------------
def _no_dropout_bert():
    # Deterministic forwards, so the per-sequence gradients computed here are those the estimator sees.
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _per_sequence_gate_gradients(model, batches):
    """``[(dL_i/dg_head, dL_i/dg_ffn)]`` for every sequence ``i`` alone, ``L_i`` its summed MLM loss."""
    layout = UnitLayout.from_model(model)
    out = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            one = {k: v[i : i + 1] for k, v in b.items()}
            h = torch.ones(layout.num_layers, layout.num_heads, requires_grad=True)
            f = torch.ones(layout.num_layers, layout.ffn_size, requires_grad=True)
            with gated(model, h, f, layout=layout):
                loss = model(**one).loss * one["labels"].numel()
            out.append(torch.autograd.grad(loss, [h, f]))
    return out


@pytest.mark.parametrize("gradient_abs", ["batch", "example", "none"])
def test_gradient_abs_by_hand(gradient_abs):
    """Default ``batch``: sum over batches of |sum of the batch's sequence gradients|; ``example`` (the paper's
    equation): sum over sequences of |gradient|; ``none`` (the reference code): the signed sum. All / tokens."""
    model = _no_dropout_bert()
    batches = random_lm_batches(2, batch_size=3, seq_len=8)
    options = {} if gradient_abs == "batch" else {"estimator_options": {"gradient_abs": gradient_abs}}
    got = compute_importance(model, batches, "lm_loss", normalize=False, show_progress=False, **options)
    grads = _per_sequence_gate_gradients(model, batches)
    tokens = sum(b["attention_mask"].sum() for b in batches)
    want = []
    for kind in (0, 1):
        g = torch.stack([gr[kind] for gr in grads]).double()  # [sequences, L, units]
        if gradient_abs == "batch":
            w = sum(part.sum(0).abs() for part in g.split(3))
        elif gradient_abs == "example":
            w = g.abs().sum(0)
        else:
            w = g.sum(0)
        want.append((w / tokens).float())
    torch.testing.assert_close(got.heads, want[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.ffn, want[1], rtol=1e-4, atol=1e-7)
    if gradient_abs == "none":
        assert (got.heads < 0).any() or (got.ffn < 0).any()  # the case is strong enough to tell signed sums apart


def test_das_passes_gradient_abs_to_gate_gradient_and_refuses_it_elsewhere():
    das = DASStrategy(gradient_abs="example", show_progress=False)
    imp = das.compute_general_importance(tiny_bert(), random_lm_batches(1))
    assert imp.meta["estimator_options"]["gradient_abs"] == "example"
    assert DASConfig().gradient_abs == "batch"
    with pytest.raises(ValueError, match="gradient_abs"):
        DASConfig(gradient_abs="sometimes")
    with pytest.raises(ValueError, match="gradient_abs='none' applies to estimator='gate_gradient' only"):
        DASConfig(gradient_abs="none", estimator="wanda")


# -- the KL proxy's softmax axis -----------------------------------------------------------------------------------
def _padded_batch():
    (b,) = random_lm_batches(1, batch_size=3, seq_len=8, labels=False)
    b["attention_mask"][1, 5:] = 0
    b["attention_mask"][2, 3:] = 0
    return b


def _kl_by_hand(h1, h2, mask, axis):
    """Sum over the distributions of ``sum p log(p / q)``: one per (sequence, token) over the hidden features for
    ``axis="hidden"``, one per (sequence, feature) over the real tokens for ``axis="sequence"``."""
    total = 0.0
    for b in range(h1.shape[0]):
        real = mask[b].bool()
        x1, x2 = h1[b, real].double(), h2[b, real].double()  # [tokens, D]
        dim = -1 if axis == "hidden" else 0
        p, q = torch.softmax(x1, dim=dim), torch.softmax(x2, dim=dim)
        total += (p * (p.log() - q.log())).sum().item()
    return total


@pytest.mark.parametrize("objective,axis", [("kl_dropout", "hidden"), ("kl_dropout_sequence", "sequence")])
def test_kl_proxy_softmax_axis_by_hand(objective, axis):
    """Default ``kl_dropout``: softmax over the hidden features of each token; ``kl_dropout_sequence``: the reference's
    softmax over the sequence (``DistillKL``, ``dim=1`` of ``[B, T, D]``), padding left out."""
    model = tiny_bert()
    model.train()
    batch = _padded_batch()
    torch.manual_seed(1)
    loss, n = OBJECTIVES[objective](model, batch)
    torch.manual_seed(1)  # the same two dropout draws
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    h1 = model(**inputs, output_hidden_states=True).hidden_states[-1]
    h2 = model(**inputs, output_hidden_states=True).hidden_states[-1]
    assert n == int(batch["attention_mask"].sum())
    assert loss.item() == pytest.approx(_kl_by_hand(h1, h2, batch["attention_mask"], axis), rel=1e-4)
    assert DASConfig().general_objective == "kl_dropout"
    DASConfig(general_objective="kl_dropout_sequence")  # the reference's axis is a choice
    raw = _raw_importance(objective=objective)
    assert raw.meta["objective"] == objective and raw.heads.abs().sum() > 0


# -- unit kinds ----------------------------------------------------------------------------------------------------
def test_no_third_unit_kind_output_dense_rows_and_bias_belong_to_no_unit():
    """The reference also masks FFN *output* units (``output.dense`` rows and bias, by an importance of the hidden
    size); hf_softmask has heads and FFN neurons only: ``output.dense`` is owned by its columns (neurons), its bias
    by no unit (the unowned-parameter policy applies)."""
    model = tiny_bert()
    layout = UnitLayout.from_model(model)
    assert {s.kind for s in layout.owned} == {"head", "ffn"}
    for l in range(layout.num_layers):
        out = f"bert.encoder.layer.{l}.output.dense"
        slices = [s for s in layout.owned if s.name.startswith(out)]
        assert [(s.name, s.kind, s.axis) for s in slices] == [(f"{out}.weight", "ffn", 1)]
        assert f"{out}.bias" in [n for n, _ in layout.unowned_parameters()["other"]]
    imp = _raw_importance(model)
    assert (tuple(imp.heads.shape), tuple(imp.ffn.shape)) == ((2, 4), (2, 64))  # no [L, hidden] output importance


# -- the contrastive views ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("view_gradients", [True, False])
def test_contrastive_views_pair_each_sequence_with_itself(view_gradients):
    """``z1[i]``, ``z2[i]``, ``z3[i]`` are views of sequence ``i`` (the reference pairs rows ``2i`` and ``2i + 1`` of
    ``ids.repeat(2, 1)``, i.e. different sequences). Without dropout z1 = z2 = the sequence's own pooled state."""
    model = _no_dropout_bert()
    model.train()
    batch = _padded_batch()
    layout = UnitLayout.from_model(model)
    g = torch.Generator().manual_seed(0)
    imp = UnitImportance(torch.rand(2, 4, generator=g), torch.rand(2, 64, generator=g))
    z1, z2, z3 = sentence_views(model, batch, imp, layout, view_gradients=view_gradients)
    for i in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i, real].unsqueeze(0)
        own = model.bert(input_ids=ids).last_hidden_state.mean(1)[0]
        with gated(model, imp.heads, imp.ffn, layout=layout):
            own_gated = model.bert(input_ids=ids).last_hidden_state.mean(1)[0]
        torch.testing.assert_close(z1[i], own, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z2[i], own, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z3[i], own_gated, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(z1[0], z1[1], atol=1e-3)  # the sequences differ, so a mispairing would show


# -- where the FFN gate multiplies ---------------------------------------------------------------------------------
def _ffn_gate_hooks(model, gate, site):
    """FFN gates placed by hand: ``gate[l]`` on the input of ``output.dense`` (after the activation) or on the output
    of ``intermediate.dense`` (before it, as the reference's ``MyRobertaIntermediate``)."""
    handles = []
    for l, layer in enumerate(model.bert.encoder.layer):
        if site == "after_activation":
            handles.append(layer.output.dense.register_forward_pre_hook(lambda m, a, l=l: (a[0] * gate[l],)))
        else:
            handles.append(layer.intermediate.dense.register_forward_hook(lambda m, a, out, l=l: out * gate[l]))
    return handles


@pytest.mark.parametrize("checkpointing", [False, True])
def test_ffn_gate_site_by_hand(checkpointing):
    """Default: the FFN gate scales the activation's output; ``ffn_gate_site="before_activation"``: the
    pre-activation (the reference). Importance = |dL/dg| / tokens with the gate where each says."""
    model = _no_dropout_bert()
    if checkpointing:
        model.gradient_checkpointing_enable()
    (batch,) = random_lm_batches(1, batch_size=3, seq_len=8)
    tokens = batch["attention_mask"].sum()
    got, want = {}, {}
    for site in ("after_activation", "before_activation"):
        options = {} if site == "after_activation" else {"estimator_options": {"ffn_gate_site": site}}
        got[site] = compute_importance(model, [batch], "lm_loss", normalize=False, show_progress=False, **options)
        model.train()
        g = torch.ones(2, 64, requires_grad=True)
        handles = _ffn_gate_hooks(model, g, site)
        try:
            (grad,) = torch.autograd.grad(model(**batch).loss * batch["labels"].numel(), [g])
        finally:
            for h in handles:
                h.remove()
        want[site] = grad.abs() / tokens
        torch.testing.assert_close(got[site].ffn, want[site], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(want["after_activation"], want["before_activation"], rtol=0.05)
    torch.testing.assert_close(got["after_activation"].heads, got["before_activation"].heads)


def test_ffn_gate_site_of_the_z3_view_and_refusals():
    model = _no_dropout_bert()
    model.train()
    batch = _padded_batch()
    layout = UnitLayout.from_model(model)
    ffn = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    imp = UnitImportance(torch.ones(2, 4), ffn)
    _, _, z3 = sentence_views(model, batch, imp, layout, ffn_gate_site="before_activation")
    handles = _ffn_gate_hooks(model, ffn, "before_activation")
    try:
        want = masked_mean_pool(model.bert(**batch).last_hidden_state, batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(z3, want, rtol=1e-4, atol=1e-5)

    das = DASStrategy(ffn_gate_site="before_activation", show_progress=False)
    assert das.compute_general_importance(tiny_bert(), random_lm_batches(1)).meta["estimator_options"] == {
        "gradient_abs": "batch",
        "ffn_gate_site": "before_activation",
    }
    assert DASConfig().ffn_gate_site == "after_activation"
    with pytest.raises(ValueError, match="ffn_gate_site='before_activation' applies to the gate estimators"):
        DASConfig(ffn_gate_site="before_activation", estimator="activation")
    with pytest.raises(ValueError, match="ffn_gate_site='before_activation' needs the FFN activation module"):
        DASStrategy(ffn_gate_site="before_activation").layout(tiny_llama())  # on_train_begin builds it
    with pytest.raises(ValueError, match="ffn_gate_site='before_activation' needs the FFN activation module"):
        compute_importance(
            tiny_llama(), random_lm_batches(1), estimator_options={"ffn_gate_site": "before_activation"}
        )
