"""The loss the Trainer reports and trains on, for models that average their own loss (issue 19).

The Trainer skips its division by the accumulation steps for a model whose forward takes ``**kwargs``, expecting
the model to divide by ``num_items_in_batch``; BertForMaskedLM takes ``**kwargs`` but averages its own loss, so
without the correction every StrategyTrainer step trains on (and logs) accumulation-steps times the loss.
"""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from hf_softmask.core.loss_scaling import loss_uses_num_items
from hf_softmask.strategies import StrategyTrainer
from tests.testing_utils import lm_rows, tiny_bert, tiny_llama, train_args


@pytest.mark.parametrize("accumulation", [2, 4])
def test_strategy_trainer_reports_the_mean_loss_under_accumulation(tmp_path, accumulation):
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows = lm_rows(n_rows=2 * accumulation, seq_len=12).with_format("torch")
    with torch.no_grad():  # by hand: the mean over the micro-batches of 2 rows of the model's own (mean) loss
        model.eval()
        expected = sum(model(**rows[2 * k : 2 * k + 2]).loss.item() for k in range(accumulation)) / accumulation
    trainer = StrategyTrainer(
        model=model,
        args=train_args(
            tmp_path,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1e-3,
        ),
        train_dataset=rows,
    )
    assert trainer.model_accepts_loss_kwargs is False
    assert trainer.train().training_loss == pytest.approx(expected, rel=1e-5)


def test_a_declared_accepts_loss_kwargs_is_honoured():
    class Declares(BertForMaskedLM):
        accepts_loss_kwargs = True  # as the Trainer honours it, so do we: the model says it divides by num_items

    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    assert loss_uses_num_items(Declares(config)) is True
    assert loss_uses_num_items(BertForMaskedLM(config)) is False  # **kwargs, but it averages its own loss
    assert loss_uses_num_items(tiny_llama()) is True  # built on loss_function: divides by num_items_in_batch
