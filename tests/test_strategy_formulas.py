"""Each strategy's defining computation against a hand computation on a small case.

Written to catch planted bugs (docs/strategies_validation.md lists which planted bug each test caught): a regularizer
blind to earlier tasks, a count of earlier tasks taken as a max instead of a sum, a replacement count without
carry-over, a normalization along the wrong axis, a Fisher from the argmax label, a Fisher replaced instead of
accumulated, a distillation without its T^2 or with the KL reversed, a utility summed over the wrong axis.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from hf_softmask.baselines.fisher import fisher_diagonal
from hf_softmask.strategies.cbp import CBPStrategy
from hf_softmask.strategies.ewc import EWCStrategy
from hf_softmask.strategies.hat import AdaHATStrategy, HATStrategy
from hf_softmask.strategies.kd import distillation_kl
from hf_softmask.tss import SubnetworkConfig, get_subnetwork_model, topk_mask
from tests.testing_utils import one_thread, random_lm_batches, tiny_bert, tiny_gpt2

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _bert():
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# -- HAT / AdaHAT ------------------------------------------------------------------------------------------------
def test_hat_regularizer_counts_only_units_free_of_earlier_tasks():
    model = _bert()
    hat = HATStrategy(c=0.75, batches_per_epoch=1)
    hat.before_task(model, 1)
    hat.cum_heads = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0]])
    hat.cum_ffn = torch.zeros(2, 64)
    hat.cum_ffn[0, :10] = 1
    model.train()
    hat.forward_kwargs(model, {})
    a_h, a_f = hat.gates.head_gate.detach(), hat.gates.ffn_gate.detach()
    # by hand: c * sum over free units of a / number of free units (units used by task 0 are not counted)
    free_sum = a_h[0, 1:3].sum() + a_h[1].sum() + a_f[0, 10:].sum() + a_f[1].sum()
    n_free = 2 + 4 + 54 + 64
    torch.testing.assert_close(hat.extra_loss(model, {}, None), 0.75 * free_sum / n_free)


def test_hat_compensation_single_step_by_hand():
    model = _bert()
    hat = HATStrategy(s_max=10.0, c=0.0, batches_per_epoch=3)
    hat.before_task(model, 0)
    model.train()
    b = random_lm_batches(1, seed=5)[0]
    hat._batch_in_epoch = 1  # the next forward is batch 2 of 3: s = 0.1 + (10 - 0.1) / 2
    s = 0.1 + 9.9 / 2
    e = hat.e_ffn.detach().clone().requires_grad_(True)
    hat.gates.head_gate, hat.gates.ffn_gate = torch.sigmoid(s * hat.e_heads.detach()), torch.sigmoid(s * e)
    (g,) = torch.autograd.grad(model(**b).loss, [e])
    e0 = e.detach()
    want = g * (10.0 / s) * (torch.cosh(s * e0) + 1) / (torch.cosh(e0) + 1)
    hat.forward_kwargs(model, b)
    model(**b).loss.backward()
    hat.after_backward(model)
    torch.testing.assert_close(hat.e_ffn.grad, want, rtol=1e-4, atol=1e-8)


def test_adahat_rate_counts_earlier_tasks_by_sum():
    model = _bert()
    ada = AdaHATStrategy(alpha=0.2, eps=0.1)
    ada.prepare_model(model)
    ada.cum_heads, ada.cum_ffn = torch.ones(2, 4), torch.ones(2, 64)
    ada.sum_heads = torch.tensor([[0.0, 1, 2, 3], [1, 1, 1, 1]])
    ada.sum_ffn = torch.full((2, 64), 2.0)
    imp = ada._protection()  # outside training R_l = 0: r = 0.2 / 0.1 = 2; rate = 2 / (I + 2)
    torch.testing.assert_close(imp.heads, 1 - torch.tensor([[1.0, 2 / 3, 0.5, 0.4], [2 / 3] * 4]))
    torch.testing.assert_close(imp.ffn, torch.full((2, 64), 0.5))


# -- WSN --------------------------------------------------------------------------------------------------------
def test_wsn_topk_keeps_the_highest_scores_of_each_layer():
    s = torch.tensor([[0.3, -1.0, 2.0], [0.1, 5.0, 0.2]])
    assert topk_mask(s, 0.5).tolist() == [[True, False, True], [False, True, False]]
    assert topk_mask(s, 1 / 6).tolist() == [[False, False, False], [False, True, False]]


# -- TSS --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_tss_importance_is_row_normalized_alpha_gradient(kind):
    base = _bert().bert if kind == "bert" else tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).transformer
    target = ["intermediate.dense"] if kind == "bert" else ["c_fc"]
    cfg = SubnetworkConfig(target_modules=target, score_init="magnitude", init_score=0.02)
    tuner = get_subnetwork_model(base, cfg)
    layers = tuner.subnetwork_layers()
    with torch.no_grad():  # prune a random third of each layer: those weights are outside the subnetwork
        g = torch.Generator().manual_seed(1)
        for layer in layers.values():
            sc = layer.subnet_scores["default"]
            sc[torch.rand(sc.shape, generator=g) < 0.33] = -1.0
    batches = random_lm_batches(2, batch_size=2, seq_len=8, seed=3)
    head = torch.randn(32, generator=torch.Generator().manual_seed(2))

    def loss_fn(b):
        return (tuner(input_ids=b["input_ids"]).last_hidden_state @ head).pow(2).mean()

    imp = tuner.compute_score_importance(loss_fn, batches)
    # by hand: d loss / d alpha = W * d loss / d W (alpha multiplies W * mask); |.| summed per batch
    for name, layer in layers.items():
        W = layer.get_base_layer().weight
        used = layer.binary_mask("default")
        total = torch.zeros_like(W)
        W.requires_grad_(True)
        for b in batches:
            (gW,) = torch.autograd.grad(loss_fn(b), [W])
            total += (W.detach() * gW).abs()
        W.requires_grad_(False)
        row_dim = 1 if kind == "bert" else 0  # nn.Linear [out, in]: a row is dim 1; Conv1D [in, out]: dim 0
        want = torch.zeros_like(W)
        for r in range(W.shape[1 - row_dim]):
            x = total.select(1 - row_dim, r)
            u = used.select(1 - row_dim, r)
            z = (x[u] - x[u].mean()) / x[u].std(unbiased=False)
            want.select(1 - row_dim, r)[u] = torch.tanh(z).abs()
        torch.testing.assert_close(imp[name], want, rtol=1e-4, atol=1e-5)


# -- CBP --------------------------------------------------------------------------------------------------------
def _cbp_steps(model, cbp, n, lr=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cbp.on_train_begin(model, opt)
    for b in random_lm_batches(n, seed=9):
        model(**b).loss.backward()
        opt.step()
        cbp.after_optimizer_step(model, opt)
        opt.zero_grad(set_to_none=True)
    return opt


def test_cbp_fractional_replacements_carry_over():
    model = _bert()
    # 64 eligible neurons per layer * 0.005 = 0.32 per step: no single step reaches one replacement
    cbp = CBPStrategy(replacement_rate=0.005, maturity_threshold=0)
    _cbp_steps(model, cbp, 10)
    # after 10 steps 3.2 replacements are due: 3 made, 0.2 carried
    assert cbp.num_replaced.tolist() == [3.0, 3.0]
    torch.testing.assert_close(cbp.pending, torch.full((2,), 0.2), atol=1e-5, rtol=0)


def test_cbp_utility_by_hand():
    model = _bert()
    cbp = CBPStrategy(replacement_rate=0.0, decay_rate=0.9)
    acts = {}
    handles = [
        layer.output.dense.register_forward_pre_hook(lambda m, a, l=l: acts.__setitem__(l, a[0].detach()))
        for l, layer in enumerate(model.bert.encoder.layer)
    ]
    _cbp_steps(model, cbp, 1)
    for h in handles:
        h.remove()
    for l, layer in enumerate(model.bert.encoder.layer):
        h = acts[l].reshape(-1, 64)
        out_w = layer.output.dense.weight.detach()  # [hidden, I]: neuron j's outgoing weights are column j
        want = 0.1 * h.abs().mean(0) * out_w.abs().sum(0)
        torch.testing.assert_close(cbp.utility[l], want, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(cbp.bias_corrected_utility(), cbp.utility / 0.1, rtol=1e-5, atol=1e-8)  # age 1


# -- Fisher (TaLoS, EWC) ---------------------------------------------------------------------------------------
class _Logistic(nn.Module):
    """p(y | x) = softmax(W x + b); ``input_ids`` carries the features."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.tensor([0.0, -0.8473]))  # p = (0.7, 0.3)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.lin(input_ids))


def test_fisher_samples_the_label_from_the_model():
    model = _Logistic()
    x = torch.ones(400, 2)
    batches = [{"input_ids": x[i : i + 50]} for i in range(0, 400, 50)]
    scores, seen = fisher_diagonal(model, batches, {"b": model.lin.bias}, seed=0)
    # by hand: d log p(y) / d b = e_y - p, so E_y~p[(e_y - p)_k^2] = p_k (1 - p_k) = 0.21 per example;
    # the argmax label (class 0) would give (1 - 0.7)^2 = 0.09 and 0.3^2 = 0.09
    assert seen == 400
    torch.testing.assert_close(scores["b"] / seen, torch.tensor([0.21, 0.21]), atol=0.02, rtol=0)


def test_ewc_penalty_accumulates_every_earlier_task():
    model = _bert()
    ewc = EWCStrategy(ewc_lambda=2.0, fisher_examples=4, gamma=0.5, normalize=True)
    loaders = [DataLoader(list(random_lm_batches(1, seed=s)[0]["input_ids"]), batch_size=4) for s in (0, 1)]
    loaders = [
        [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ld] for ld in loaders
    ]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def fisher(t):  # what after_task estimates, computed independently: mean over examples, divided by its mean entry
        f, seen = fisher_diagonal(model, loaders[t], params, max_examples=4, seed=t)
        f = {n: v / seen for n, v in f.items()}
        mean = sum(float(v.sum()) for v in f.values()) / sum(v.numel() for v in f.values())
        return {n: v / mean for n, v in f.items()}

    f0 = fisher(0)
    ewc.after_task(model, 0, loaders[0])
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    f1 = fisher(1)
    ewc.after_task(model, 1, loaders[1])
    anchor = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.02)
    want = 0.5 * 2.0 * sum(((0.5 * f0[n] + f1[n]) * (params[n].detach() - anchor[n]) ** 2).sum() for n in params)
    torch.testing.assert_close(ewc.penalty(model), want, rtol=1e-4, atol=0)


def test_ewc_penalty_sees_through_ddp_and_torch_compile(tmp_path):
    """The Trainer's loss gets the wrapped model: the penalty must cover the same parameters under their own names.
    A compiled model's names used to carry ``_orig_mod.`` (KeyError); unwrapping must leave the wrapper intact."""
    import torch.distributed as dist

    model = _bert()
    ewc = EWCStrategy(ewc_lambda=2.0, fisher_examples=4)
    batch = random_lm_batches(1, seed=0)[0]
    ewc.after_task(model, 0, [{**batch, "labels": batch["input_ids"].clone()}])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    want = ewc.penalty(model)
    assert want > 0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        compiled = torch.compile(ddp)  # what accelerate builds for DDP with torch_compile (compiled lazily: no call)
        for wrapped in (ddp, compiled, torch.compile(model)):
            torch.testing.assert_close(ewc.penalty(wrapped), want, rtol=0, atol=0)
        assert compiled._orig_mod is ddp
    finally:
        dist.destroy_process_group()


# -- KD ---------------------------------------------------------------------------------------------------------
def test_distillation_kl_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]])
    T = 2.0
    pt = torch.softmax(t / T, -1)
    want_rows = (pt * (pt.log() - torch.log_softmax(s / T, -1))).sum(-1) * T * T  # KL(teacher || student) * T^2
    torch.testing.assert_close(distillation_kl(s, t, T), want_rows.mean())
    mask = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(distillation_kl(s, t, T, mask), want_rows[0])
