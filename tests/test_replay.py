"""Replay: every batch the model sees mixes the named sources at the ratio, under a real Trainer, gradient
accumulation and accelerate's 2-process sharding; R = 0 is the plain stream; rows are a function of (seed, index)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

from hf_softmask.baselines.replay import (
    ReplayMixture,
    replay_dataset,
    replay_rows_per_batch,
    replay_sources,
    replay_training_overrides,
)
from tests.testing_utils import launch_cpu_processes, tiny_gpt2, tiny_llama, train_args

SEQ = 8
BAND = 20  # source k's tokens lie in [1 + BAND * k, 1 + BAND * (k + 1)): the source of a row is read off its tokens


def _rows(n, band, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1 + BAND * band, 1 + BAND * (band + 1), (n, SEQ), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": r.clone()} for r in ids]


def _band(row_ids) -> int:
    return int((int(row_ids[0]) - 1) // BAND)


def _sets():
    """Three earlier domains' worth of data: domain (band 0), domains 1 and 2 (bands 1, 2), general (band 3)."""
    return _rows(23, 0, 0), [_rows(7, 1, 1), _rows(11, 2, 2)], _rows(5, 3, 3)


@pytest.mark.parametrize("ratio,batch,want", [(0.25, 8, 2), (0.3, 4, 1), (0.375, 4, 2), (0.5, 2, 1), (0.0, 4, 0)])
def test_replay_rows_rounding_rule(ratio, batch, want):
    assert replay_rows_per_batch(ratio, batch) == want


@pytest.mark.parametrize(
    "ratio,batch,msg",
    [(1.0, 4, "at 1 no batch"), (0.05, 4, "rounds to 0"), (0.9, 4, "no current-domain row"), (-0.1, 4, r"\[0, 1\)")],
)
def test_replay_ratio_refused(ratio, batch, msg):
    with pytest.raises(ValueError, match=msg):
        replay_rows_per_batch(ratio, batch)


def test_zero_ratio_and_no_source_give_the_plain_stream():
    domain, earlier, _general = _sets()
    assert replay_dataset(domain, earlier, 0.0, 4) is domain
    assert replay_dataset(domain, [], 0.5, 4) is domain  # first domain without general text
    assert replay_training_overrides(domain) == {}


def test_sources_of_a_domain():
    domain, earlier, general = _sets()
    srcs, names = replay_sources([earlier[0], earlier[1], domain], 2, general, True, names=["a", "b", "c"])
    assert srcs == [earlier[0], earlier[1], general] and names == ["a", "b", "general"]
    assert replay_sources([domain], 0)[0] == []
    with pytest.raises(ValueError, match="replay_general"):
        replay_sources([domain], 0, None, True)


def test_every_trainer_micro_batch_mixes_at_the_ratio(tmp_path):
    """A real Trainer run, gradient accumulation 2: every micro-batch has B - r domain rows and r replay rows,
    spread over the K = 3 sources in turn (r = 3 = K: exactly one row each)."""
    domain, earlier, general = _sets()
    B, steps, ga = 8, 3, 2
    r = replay_rows_per_batch(0.4, B)
    assert r == 3
    mix = replay_dataset(
        domain, earlier + [general], 0.4, B, num_batches=steps * ga, seed=5, source_names=["d1", "d2", "general"]
    )
    assert isinstance(mix, ReplayMixture) and len(mix) == steps * ga * B
    seen = []
    model = tiny_gpt2()
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    args = train_args(
        tmp_path,
        per_device_train_batch_size=B,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        **replay_training_overrides(mix),
    )
    replay_training_overrides(mix, args)  # batch sizes agree
    from transformers import Trainer

    Trainer(model=model, args=args, train_dataset=mix).train()
    assert len(seen) == steps * ga
    for g, batch in enumerate(seen):
        counts = Counter(_band(row) for row in batch)
        assert counts == Counter({0: B - r, 1: 1, 2: 1, 3: 1}), (g, counts)
        # what the dataset says it put there is what the model got
        assert [mix.source_of(g * B + s) for s in range(B)] == ["domain"] * (B - r) + ["d1", "d2", "general"]
        torch.testing.assert_close(batch, torch.stack([mix[g * B + s]["input_ids"] for s in range(B)]))


def test_mixture_of_token_block_datasets_with_the_runners_collator(tmp_path, minilm_dir):
    """What the runner holds: datasets.Dataset token blocks (lists) and its LM collator (padding, labels)."""
    import datasets
    from transformers import AutoTokenizer, Trainer

    from hf_softmask.data import lm_data_collator

    def blocks(band, n):
        return datasets.Dataset.from_dict(
            {
                "input_ids": [[1 + BAND * band + (i % BAND)] * SEQ for i in range(n)],
                "attention_mask": [[1] * SEQ for _ in range(n)],
            }
        )

    mix = replay_dataset(blocks(0, 10), [blocks(1, 6)], 0.5, 4, num_batches=2, seed=0)
    seen = []
    model = tiny_gpt2()
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["labels"].clone()), with_kwargs=True)
    args = train_args(tmp_path, per_device_train_batch_size=4, max_steps=2, **replay_training_overrides(mix))
    collator = lm_data_collator(AutoTokenizer.from_pretrained(minilm_dir), mlm=False)
    Trainer(model=model, args=args, train_dataset=mix, data_collator=collator).train()
    assert len(seen) == 2 and all(Counter(_band(row) for row in labels) == Counter({0: 2, 1: 2}) for labels in seen)


def test_uneven_share_rotates_over_sources():
    """r = 2 rows over K = 3 sources: each batch has 2 distinct sources; over 3 batches each source gets 2 rows."""
    domain, earlier, general = _sets()
    mix = ReplayMixture(domain, earlier + [general], batch_size=4, replay_rows=2, num_batches=3)
    per_batch = [Counter(_band(mix[g * 4 + s]["input_ids"]) for s in range(4)) for g in range(3)]
    assert all(c[0] == 2 and sum(c.values()) == 4 and max(c[k] for k in (1, 2, 3)) == 1 for c in per_batch)
    total = sum(per_batch, Counter())
    assert [total[k] for k in (1, 2, 3)] == [2, 2, 2]


def test_two_processes_each_get_mixed_batches():
    """accelerate's sharding (what the Trainer applies under DDP/FSDP) gives each of 2 ranks whole mixed batches."""
    from accelerate.data_loader import prepare_data_loader

    domain, earlier, _general = _sets()
    B = 4
    mix = replay_dataset(domain, earlier, 0.5, B, num_batches=5, seed=1)
    ranks = []
    for rank in range(2):
        base = DataLoader(
            mix,
            batch_size=B,
            sampler=SequentialSampler(mix),
            collate_fn=lambda rows: torch.stack([r["input_ids"] for r in rows]),
        )
        dl = prepare_data_loader(base, num_processes=2, process_index=rank, put_on_device=False, even_batches=True)
        ranks.append(list(dl))
    assert len(ranks[0]) == len(ranks[1]) == 3  # 5 batches: the last rank's third batch wraps around to batch 0
    for batches in ranks:
        for batch in batches:
            assert Counter(_band(row) for row in batch) == Counter({0: 2, 1: 1, 2: 1})
    # the ranks see different batches (no duplicated work inside the first pass)
    assert not torch.equal(ranks[0][0], ranks[1][0])


def test_rows_are_a_function_of_seed_and_index_without_replacement():
    domain, earlier, _general = _sets()
    B, r = 4, 1
    assert ReplayMixture(domain, earlier, B, r, seed=3).num_batches == 8  # default: one pass, ceil(23 / 3)
    mix = ReplayMixture(domain, earlier, B, r, seed=3, num_batches=16)
    order = [mix.locate(j) for j in range(len(mix))]
    # a fresh object asked for rows out of order (a resumed run) gives the same rows
    fresh = ReplayMixture(domain, earlier, B, r, seed=3, num_batches=16)
    assert [fresh.locate(j) for j in reversed(range(len(mix)))] == order[::-1]
    assert order != [ReplayMixture(domain, earlier, B, r, seed=4, num_batches=16).locate(j) for j in range(len(mix))]
    # each pass over the domain (23 rows) draws every row once, the next pass in a new order
    dom = [row for k, row in order if k < 0]
    assert len(dom) == 48 and sorted(dom[:23]) == sorted(dom[23:46]) == list(range(23)) and dom[:23] != dom[23:46]
    # replay: 16 draws alternate over the 2 sources; source 0 (7 rows) draws each row once per pass
    src0 = [row for k, row in order if k == 0]
    assert len(src0) == 8 and sorted(src0[:7]) == list(range(7))


def test_mixture_refuses_mismatched_sources():
    domain, earlier, _ = _sets()
    bad = [{"input_ids": torch.ones(SEQ, dtype=torch.long)}]
    with pytest.raises(ValueError, match="row keys"):
        ReplayMixture(domain, [bad], 4, 1)
    mix = ReplayMixture(domain, earlier, 4, 1)
    with pytest.raises(ValueError, match="per_device_train_batch_size is 8"):
        replay_training_overrides(mix, train_args("unused", per_device_train_batch_size=8))


# -- two real processes (DDP over gloo) ---------------------------------------------------------------------------
def _ddp_worker(out):
    """Run inside `accelerate launch` with 2 processes: a Trainer (DDP, gradient accumulation 2) over a replay
    mixture with a weight EMA, then WiSE-FT; each rank saves the batches it saw and its final weights."""
    import json

    from safetensors.torch import save_file
    from transformers import Trainer

    from hf_softmask.baselines.merging import WeightEMA, interpolate_weights_, snapshot_weights

    domain, earlier, general = _sets()
    B, steps, ga = 4, 3, 2
    args = train_args(
        out / "trainer",
        per_device_train_batch_size=B,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        train_sampling_strategy="sequential",
    )
    assert args.world_size == 2
    mix = replay_dataset(domain, earlier + [general], 0.5, B, num_batches=steps * ga * args.world_size, seed=2)
    assert replay_training_overrides(mix)["train_sampling_strategy"] == args.train_sampling_strategy
    model = tiny_gpt2()
    before = snapshot_weights(model)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].tolist()), with_kwargs=True)
    Trainer(model=model, args=args, train_dataset=mix, callbacks=[WeightEMA(0.5)]).train()
    interpolate_weights_(model, before, 0.5)
    rank = args.process_index
    (out / f"seen{rank}.json").write_text(json.dumps(seen))
    params = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(params, str(out / f"params{rank}.safetensors"))

    # WiSE-FT on a model sharded over the 2 ranks with FSDP2: each rank merges its own shards, nothing gathered
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = tiny_llama()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (2,)))
    before = snapshot_weights(sharded)
    with torch.no_grad():
        for p in sharded.parameters():
            p.to_local().mul_(2.0)  # "after the domain": every weight doubled
    interpolate_weights_(sharded, before, 0.3)
    full = {n: p.full_tensor().contiguous() for n, p in sharded.named_parameters()}
    if rank == 0:
        save_file(full, str(out / "fsdp2_merged.safetensors"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ddp_processes_each_train_on_mixed_batches(tmp_path):
    """Also: WiSE-FT of an FSDP2 model sharded over the 2 ranks equals the hand interpolation of the full weights."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    launch_cpu_processes(Path(__file__), tmp_path)
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 6  # 3 steps x 2 micro-batches per rank
    for batches in seen:
        for batch in batches:  # r = 2 rows over K = 3 sources in turn: 2 domain rows, 2 replay rows of 2 sources
            counts = Counter(_band(torch.tensor(row)) for row in batch)
            assert counts[0] == 2 and sum(counts.values()) == 4 and max(counts[k] for k in (1, 2, 3)) == 1
    flat = [tuple(map(tuple, b)) for r in range(2) for b in seen[r]]
    assert len(set(flat)) == 12  # the two ranks trained on 12 different batches
    p0, p1 = load_file(str(tmp_path / "params0.safetensors")), load_file(str(tmp_path / "params1.safetensors"))
    assert all(torch.equal(p0[n], p1[n]) for n in p0)  # EMA + WiSE-FT leave the replicas identical
    merged = load_file(str(tmp_path / "fsdp2_merged.safetensors"))

    for name, p in tiny_llama().named_parameters():
        assert torch.equal(merged[name], 0.3 * (2.0 * p.detach()) + 0.7 * p.detach()), name


if __name__ == "__main__":
    import sys
    from pathlib import Path

    _ddp_worker(Path(sys.argv[1]))
    from hf_softmask.continual import end_processes

    end_processes()
