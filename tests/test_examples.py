"""The examples the README shows run as written and do what they say."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM

from hf_softmask.utils.assets import minilm_path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_softmask_callback_example_scales_each_heads_first_update_by_one_minus_importance(tmp_path):
    model, importance = _load("softmask_callback").main(max_steps=1, output_dir=str(tmp_path))
    before = AutoModelForMaskedLM.from_pretrained(minilm_path())
    assert (tmp_path / "importance").is_dir()
    lr, n_heads = 1e-4, model.config.num_attention_heads
    d = model.config.hidden_size // n_heads
    for layer in (0, model.config.num_hidden_layers - 1):
        q_new = model.bert.encoder.layer[layer].attention.self.query.weight.detach()
        q_old = before.bert.encoder.layer[layer].attention.self.query.weight.detach()
        # First AdamW step: every coordinate moves lr * sign(grad) (+ a tiny decay term), times the mask 1 - I.
        moved = (q_new - q_old).abs().view(n_heads, d, -1).mean(dim=(1, 2)) / lr
        expected = 1 - importance.heads[layer].float()
        torch.testing.assert_close(moved, expected, atol=0.03, rtol=0.0)
