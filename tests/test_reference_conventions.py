"""Where hf_softmask follows the published DAS code (ContinualLM) exactly, and where it departs on purpose.

Reference read (UIC-Liu-Lab/ContinualLM, via the code search of this project):
- ``networks/baselines/softmask.py`` @ 26b4083a: ``impt_norm`` -- for each layer ``(x - x.mean()) / x.std()``
  (``torch.std``: unbiased), then ``tanh``, then ``abs``; ``compute_impt`` adds ``head_mask.grad`` (signed, no
  ``abs``) per batch and divides by the tokens; ``soft_mask_gradient`` masks heads, intermediate units and output
  units (``output.dense`` rows and bias).
- ``networks/transformers/roberta.py`` @ 26b4083a: ``MyRobertaIntermediate`` multiplies ``dense(x)`` by
  ``intermediate_mask`` BEFORE the activation; ``MyRobertaOutput`` multiplies ``output.dense``'s output by
  ``output_mask``.
- ``utils/model.py`` @ 3b2c44bb: ``DistillKL`` takes ``softmax(dim=1)`` of ``[B, T, D]`` hidden states (the sequence
  axis).
- ``networks/posttrain/model.py`` @ 3b2c44bb: DAS views ``inputs_ori_ids.repeat(2, 1)`` then
  ``.view(-1, 2, T, D)``, so ``z1[i]``/``z2[i]`` are rows ``2i``/``2i+1``: different sequences.

Each test pins one convention on a tiny BERT (docs/algorithms.md §2-4 states each one and its reason).
"""

import pytest
import torch

from hf_softmask import compute_importance
from tests.testing_utils import random_lm_batches, tiny_bert


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
