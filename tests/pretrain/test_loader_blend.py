"""PackedLoader: weighted blending, the validation split, and DataLoader workers matching the slots."""

import itertools

import pytest
import torch

from undertow.pretrain.loader import PackedLoader
from tests.pretrain.loader_data import (
    document_multiset,
    documents_from_batches,
    random_documents,
    write_shard_dir,
)


@pytest.fixture
def sources(tmp_path):
    """Three sources with disjoint token ranges: [1, 1000), [2000, 3000), [5000, 6000)."""
    made = []
    for i, (low, sizes) in enumerate([(1, [6, 5, 6]), (2000, [4, 4]), (5000, [5])]):
        docs = random_documents(sum(sizes), seed=30 + i, min_len=2, low=low, high=low + 999)
        directory = str(tmp_path / f"src{i}")
        write_shard_dir(directory, docs, sizes)
        made.append((directory, docs))
    return made


def source_of(token: int) -> int:
    return {0: 0, 2: 1, 5: 2}[int(token) // 1000]


def test_blending_follows_the_weights(sources):
    loader = PackedLoader([s for s, _ in sources], weights=[3.0, 1.0, 0.0], seq_len=4, batch_size=64, seed=1)
    counts = [0, 0, 0]
    for batch in itertools.islice(loader.iter_slot(0), 40):
        for row in batch["input_ids"]:
            assert len({source_of(t) for t in row}) == 1  # a row comes from one source
            counts[source_of(row[0])] += 1
    rows = sum(counts)  # 2560 rows; one standard deviation of the share is 0.0086
    assert counts[2] == 0  # a weight-0 source is never read
    assert abs(counts[0] / rows - 0.75) < 0.045


def test_one_pass_blend_reads_every_document_once(sources):
    loader = PackedLoader(
        [s for s, _ in sources],
        weights=[0.2, 0.5, 0.3],
        seq_len=8,
        batch_size=2,
        world_size=2,
        num_workers=2,
        loop=False,
    )
    got = []
    for slot in range(loader.num_slots):
        batches = list(loader.iter_slot(slot))
        assert all((b["input_ids"] != 0).all() for b in batches[:-1])  # padding only at the very end
        got += documents_from_batches(batches, source_of=source_of)
    assert document_multiset(got) == document_multiset(d for _, docs in sources for d in docs)


def test_val_and_train_split_the_documents(sources):
    paths = [s for s, _ in sources]
    everything = document_multiset(d for _, docs in sources for d in docs)
    assert len(set(everything)) == len(everything)  # documents are unique, so sets compare them

    def read(split: str) -> list:  # all slots of 2 ranks x 2 workers
        loader = PackedLoader(
            paths, seq_len=8, batch_size=2, world_size=2, num_workers=2, split=split, val_fraction=0.25, loop=False
        )
        slots = (loader.iter_slot(s) for s in range(loader.num_slots))
        return document_multiset(d for batches in slots for d in documents_from_batches(batches, source_of=source_of))

    train, val = read("train"), read("val")
    assert 0 < len(val) < len(train)
    assert not set(train) & set(val)
    assert sorted(train + val) == everything


def test_workers_deliver_the_slots_round_robin(sources):
    """Two workers of rank 1 in a real DataLoader give exactly slots 2 and 3 alternately."""
    kwargs = dict(
        sources=[s for s, _ in sources], seq_len=8, batch_size=2, world_size=2, rank=1, num_workers=2, loop=False
    )
    loader = PackedLoader(**kwargs)
    streams = [list(loader.iter_slot(2)), list(loader.iter_slot(3))]
    expected = [b for pair in itertools.zip_longest(*streams) for b in pair if b is not None]
    got = list(loader)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (
            all(torch.equal(g[k], e[k]) for k in ("input_ids", "labels", "cu_seqlens"))
            and g["max_seqlen"] == e["max_seqlen"]
        )
        assert not any(k.startswith("_") for k in g)  # worker bookkeeping is stripped
