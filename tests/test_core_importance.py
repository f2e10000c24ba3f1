"""UnitImportance algebra and persistence, and compute_importance on real models and text."""

import math
import warnings

import pytest
import torch

from hf_softmask import EmptyDataError, ImportanceShapeError, UnitImportance, UnitLayout, compute_importance
from tests.testing_utils import random_lm_batches, tiny_bert, tiny_gpt2, tiny_llama


def _corr(a: UnitImportance, b: UnitImportance) -> float:
    x = torch.cat([a.heads.flatten(), a.ffn.flatten()])
    y = torch.cat([b.heads.flatten(), b.ffn.flatten()])
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


def test_abs_tanh_normalization_is_per_layer_abs_tanh_z_and_flat_layer_gives_zero_with_warning():
    heads = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    ffn = torch.arange(16.0).view(2, 8)
    with pytest.warns(RuntimeWarning, match="constant"):
        imp = UnitImportance(heads, ffn).normalized("abs_tanh")
    row = heads[0]
    z = (row - row.mean()) / row.std(unbiased=True)  # torch.std, as the published impt_norm
    torch.testing.assert_close(imp.heads[0], torch.tanh(z).abs())
    assert imp.heads[1].tolist() == [0.0] * 4
    assert torch.isfinite(imp.ffn).all() and imp.ffn.min() >= 0 and imp.ffn.max() <= 1


def test_nan_importance_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        UnitImportance(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 3)).normalized()


def test_emax_accumulation_and_shape_check():
    a = UnitImportance(torch.tensor([[0.1, 0.9]]), torch.tensor([[0.5, 0.2, 0.0]]))
    b = UnitImportance(torch.tensor([[0.4, 0.3]]), torch.tensor([[0.1, 0.8, 0.0]]))
    c = a.maximum(b)
    torch.testing.assert_close(c.heads, torch.tensor([[0.4, 0.9]]))
    torch.testing.assert_close(c.ffn, torch.tensor([[0.5, 0.8, 0.0]]))
    with pytest.raises(ImportanceShapeError):
        a.maximum(UnitImportance(torch.zeros(2, 2), torch.zeros(2, 3)))


def test_save_load_roundtrip_and_wrong_model_shape(tmp_path):
    model = tiny_bert()
    layout = UnitLayout.from_model(model)
    imp = compute_importance(model, random_lm_batches(2), "lm_loss", show_progress=False)
    imp.save_pretrained(tmp_path / "imp")
    assert sorted(p.name for p in (tmp_path / "imp").iterdir()) == ["importance.safetensors", "importance_config.json"]
    loaded = UnitImportance.from_pretrained(tmp_path / "imp", layout=layout)
    assert torch.equal(loaded.heads, imp.heads) and torch.equal(loaded.ffn, imp.ffn)
    assert loaded.meta["layout"]["model_type"] == "bert"
    # The GPT-2 tiny model has ffn 128, not 64: loading onto it names both shapes and the fix.
    with pytest.raises(ImportanceShapeError, match="recompute"):
        UnitImportance.from_pretrained(tmp_path / "imp", layout=UnitLayout.from_model(tiny_gpt2()))
    with pytest.raises(FileNotFoundError):
        UnitImportance.from_pretrained(tmp_path)


@pytest.mark.parametrize("objective", ["kl_dropout", "lm_loss"])
def test_compute_importance_leaves_no_grad_and_restores_mode(objective):
    model = tiny_bert(hidden_dropout_prob=0.1).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    imp = compute_importance(model, random_lm_batches(3), objective, show_progress=False)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert imp.heads.shape == (2, 4) and imp.ffn.shape == (2, 64)
    assert 0 <= imp.heads.min() and imp.heads.max() <= 1 and imp.heads.std() > 0
    assert imp.meta["objective"] == objective and imp.meta["tokens"] > 0


def test_gate_grads_are_zeroed_between_batches():
    """Per-batch |grad| summed: the same batch twice gives exactly twice one batch (not 1 + 2 = 3 times)."""
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    batch = random_lm_batches(1)[0]
    one = compute_importance(model, [batch], "lm_loss", normalize=False, show_progress=False)
    two = compute_importance(model, [batch, batch], "lm_loss", normalize=False, show_progress=False)
    # Raw values are divided by tokens: identical if each batch is counted once.
    torch.testing.assert_close(two.heads, one.heads)
    torch.testing.assert_close(two.ffn, one.ffn)


def test_empty_dataloader_is_a_clear_error():
    with pytest.raises(EmptyDataError, match="at least one non-empty batch"):
        compute_importance(tiny_bert(), [], "kl_dropout", show_progress=False)


def test_nan_loss_is_a_clear_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        compute_importance(model, random_lm_batches(1), "lm_loss", show_progress=False)


def test_lm_loss_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        compute_importance(tiny_bert(), random_lm_batches(1, labels=False), "lm_loss", show_progress=False)


def test_kl_dropout_split_half_on_tiny_llama_without_dropout():
    """A Llama has no dropout: the estimator perturbs gated outputs itself, and the signal is stable."""
    model = tiny_llama()
    half_a = random_lm_batches(4, seed=1, labels=False)
    half_b = random_lm_batches(4, seed=2, labels=False)
    a = compute_importance(model, half_a, "kl_dropout", normalize=False, show_progress=False)
    b = compute_importance(model, half_b, "kl_dropout", normalize=False, show_progress=False)
    assert a.heads.abs().sum() > 0
    assert _corr(a, b) >= 0.9
    with pytest.raises(ValueError, match="perturbation_dropout"):
        compute_importance(model, half_a, "kl_dropout", perturbation_dropout=0.0, show_progress=False)


@pytest.mark.slow
def test_kl_dropout_split_half_on_minilm_real_text(minilm_dir):
    """Importance from two disjoint halves of BBC text correlates >= 0.9: signal, not rounding noise."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hf_softmask.data import load_bbc_topics

    topics = load_bbc_topics()
    texts = [doc for name in sorted(topics) for doc in topics[name][:4]]
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForMaskedLM.from_pretrained(minilm_dir)

    def batches(docs):
        return [
            dict(tok(docs[i : i + 5], truncation=True, max_length=128, padding=True, return_tensors="pt"))
            for i in range(0, len(docs), 5)
        ]

    a = compute_importance(model, batches(texts[0::2]), "kl_dropout", normalize=False, show_progress=False)
    b = compute_importance(model, batches(texts[1::2]), "kl_dropout", normalize=False, show_progress=False)
    assert _corr(a, b) >= 0.9
    # In eval mode (dropout off) the two views are identical and the KL gradient vanishes: the
    # published bug. The estimator must switch dropout on itself.
    model.eval()
    c = compute_importance(model, batches(texts[0::2][:5]), "kl_dropout", normalize=False, show_progress=False)
    assert c.heads.abs().max() > 1e-6 and not model.training
    assert not math.isnan(_corr(a, c))


class _RecordingHub:
    """Stands in for ``huggingface_hub.HfApi`` (tests run offline): records what an upload would send."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
        from pathlib import Path

        self.calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), commit_message))
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_to_hub_uploads_the_saved_files(monkeypatch):
    import huggingface_hub

    from hf_softmask.tss import SubnetworkConfig, get_subnetwork_model

    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingHub)
    _RecordingHub.calls.clear()
    imp = compute_importance(tiny_bert(), random_lm_batches(1), "lm_loss", show_progress=False)
    assert imp.push_to_hub("me/imp", private=True).endswith("/commit/0")
    tuner = get_subnetwork_model(tiny_bert().bert, SubnetworkConfig())
    tuner.push_to_hub("me/tss", commit_message="task 1")
    assert _RecordingHub.calls == [
        ("create_repo", "me/imp", True),
        ("upload", "me/imp", ["importance.safetensors", "importance_config.json"], "Upload unit importance"),
        ("create_repo", "me/tss", None),
        ("upload", "me/tss", ["adapter_config.json", "adapter_model.safetensors"], "task 1"),
    ]


def test_runner_stage_push_uploads_through_the_same_helper(tmp_path, monkeypatch):
    """A finished pre-training stage goes up like an importance file: one repo per stage, its files as saved."""
    from types import SimpleNamespace

    import huggingface_hub

    from hf_softmask.continual.pretraining.hub_push import HubPusher

    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingHub)
    _RecordingHub.calls.clear()
    stage = tmp_path / "1_business"
    tiny_bert().save_pretrained(stage)
    args = SimpleNamespace(output_dir=str(tmp_path), hub_model_id="me/tiny", hub_token=None, hub_private_repo=True)
    HubPusher(args, say=print).push(stage, "1_business")
    assert _RecordingHub.calls == [
        ("create_repo", "me/tiny-1-business", True),
        ("upload", "me/tiny-1-business", ["config.json", "model.safetensors"], "hf_softmask: 1_business"),
    ]
