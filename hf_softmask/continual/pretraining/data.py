"""The text of a pre-training run: its domains as token blocks, general text, collators and fixed evaluation sets."""

from __future__ import annotations

import random

from torch.utils.data import DataLoader

from ...data import (
    build_document_blocks,
    build_lm_dataset,
    general_text_documents,
    general_text_keys,
    lm_data_collator,
    load_domains,
    split_documents,
)
from .config import ContinualPretrainingArguments
from .evaluation import FixedEvalSet

__all__ = ["PretrainingData"]


def _domain_spec(entry):
    """CLI forms 'name=/path' and 'name=hf:dataset' to load_domains dicts; BBC names and dicts pass through."""
    if isinstance(entry, str) and "=" in entry:
        name, source = entry.split("=", 1)
        if source.startswith("hf:"):
            return {"name": name, "hf_dataset": source[3:]}
        return {"name": name, "path": source}
    return entry


def _describe(entry) -> str:
    """Where a domain's text comes from, for error messages."""
    spec = _domain_spec(entry)
    if isinstance(spec, dict):
        for key in ("train_files", "path", "hf_dataset"):
            if spec.get(key) is not None:
                return f"{key}={spec[key]}"
    return "BBC topic"


def _blocks(texts, tokenizer, block_size: int, max_blocks, what: str):
    try:
        return build_lm_dataset(texts, tokenizer, block_size, max_blocks)
    except ValueError as e:
        raise ValueError(f"{what}: {e} (from {len(texts)} document(s))") from None


class PretrainingData:
    """Token blocks, collators and fixed evaluation sets of one run."""

    def __init__(self, args: ContinualPretrainingArguments, tokenizer, mlm: bool):
        self.args = args
        self.mlm = mlm
        # The split and the evaluation blocks follow split_seed, so the seeds of a sweep share evaluation blocks.
        split_seed = args.split_seed if args.split_seed is not None else args.seed
        try:
            self.domains = load_domains(
                [_domain_spec(d) for d in args.domains],
                max_train_docs=args.max_train_docs,
                max_eval_docs=args.max_eval_docs,
                eval_fraction=args.eval_fraction,
                seed=split_seed,
            )
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"--domains: {e}") from None
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be unique, got {names}")
        self.names = names
        # Warm-up and evaluation collate as before (torch's RNG, seeded); the Trainer's batches get per-block MLM
        # masks so that a resumed domain sees exactly the batches of the uninterrupted run (see data.py). Per-block
        # masks repeat across epochs, which is why the many-epoch LM-head warm-up keeps drawing fresh ones.
        self.collator = lm_data_collator(tokenizer, mlm=mlm, mlm_probability=args.mlm_probability)
        self.train_collator = lm_data_collator(
            tokenizer, mlm=mlm, mlm_probability=args.mlm_probability, seed=args.seed, per_block=True
        )
        bs = args.block_size
        sources = [_describe(d) for d in args.domains]
        self.train = [
            _blocks(d.train_texts, tokenizer, bs, args.max_train_blocks, f"domain {d.name!r} ({src}), training text")
            for d, src in zip(self.domains, sources)
        ]
        self.eval = [
            FixedEvalSet(
                d.name,
                self._eval_blocks(d.eval_texts, d.eval_ids, tokenizer, f"domain {d.name!r} ({src}), held-out text"),
                self.collator,
                args.per_device_eval_batch_size,
                seed=split_seed + 1,
            )
            for d, src in zip(self.domains, sources)
        ]
        # Documents keep their names (pydoc topic keys) so the held-out general documents are identifiable.
        general = general_text_documents()
        general_train, general_eval = split_documents(
            general, test_fraction=args.general_eval_fraction, seed=split_seed
        )
        # The LM-head warm-up, a 'general' importance source and general-text replay read it: tokenize no more than
        # they use (replay: every batch's share of one domain; fewer blocks are reused in new orders).
        needed = max(args.lm_head_warmup_steps * args.per_device_train_batch_size, args.importance_blocks, 1)
        if args.replay_general:
            needed = max(
                needed,
                args.per_device_train_batch_size
                * max(args.max_steps, 1)
                * args.gradient_accumulation_steps
                * args.world_size,
            )
        self.general_train = build_lm_dataset(general_train, tokenizer, bs, max_blocks=needed)
        topic = {text: key for key, text in zip(general_text_keys(), general)}
        self.general_eval = FixedEvalSet(
            "general",
            self._eval_blocks(
                general_eval, [f"general/{topic[t]}" for t in general_eval], tokenizer, "general text, held out"
            ),
            self.collator,
            args.per_device_eval_batch_size,
            seed=split_seed + 2,
        )

    def _eval_blocks(self, texts, ids, tokenizer, what: str):
        """Held-out blocks by document (``eval_blocks_per_document``), or the old token stream when it is 0."""
        a = self.args
        if not a.eval_blocks_per_document:
            return _blocks(texts, tokenizer, a.block_size, a.max_eval_blocks or 16, what)
        try:
            blocks = build_document_blocks(
                texts, ids, tokenizer, a.block_size, a.eval_blocks_per_document, a.max_eval_docs
            )
            return blocks.select(range(min(len(blocks), a.max_eval_blocks))) if a.max_eval_blocks else blocks
        except ValueError as e:
            raise ValueError(f"{what}: {e} (from {len(texts)} document(s))") from None

    def importance_loader(self, dataset, salt: int, rank: int, world: int) -> DataLoader:
        """``importance_blocks`` blocks of ``dataset`` (a fixed random sample), this process's share of them."""
        n = min(self.args.importance_blocks, len(dataset))
        order = list(range(len(dataset)))
        random.Random(f"{self.args.seed}:{salt}").shuffle(order)
        mine = order[:n][rank::world]
        if not mine:
            raise ValueError(
                f"importance_blocks={self.args.importance_blocks} gives process {rank} of {world} no block; raise it"
            )
        # The MLM mask of the importance batches is drawn from a generator seeded per process and stage.
        collate = self.collator
        if self.mlm:
            collate = lm_data_collator(
                self.collator.tokenizer,
                mlm=True,
                mlm_probability=self.args.mlm_probability,
                seed=self.args.seed * 1000 + salt * 10 + rank,
            )
        return DataLoader(dataset.select(mine), batch_size=self.args.per_device_train_batch_size, collate_fn=collate)
