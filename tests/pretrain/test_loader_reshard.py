"""A run resumed with another world size or number of workers: the old slots' streams finish their
epochs in the new slots, the new plans take over after, and no document is skipped or read twice."""

import collections
import itertools
import json

import numpy as np
import pytest

from undertow.pretrain.loader import PackedLoader
from undertow.pretrain.loader.slot import LoaderSpec, SlotProducer, reshard_slots
from undertow.pretrain.loader.sources import resolve_source
from undertow.pretrain.loader.streams import DocumentStream
from tests.pretrain.loader_data import document_multiset, random_documents, write_shard_dir


@pytest.fixture
def sources(tmp_path):
    """Two sources with disjoint token ranges (no token is the pad id 0)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    docs_a = random_documents(23, seed=20, max_len=30)
    docs_b = random_documents(11, seed=21, max_len=30, low=2000, high=3000)
    write_shard_dir(a, docs_a, [5, 4, 6, 3, 5])
    write_shard_dir(b, docs_b, [4, 4, 3])
    return (a, docs_a), (b, docs_b)


def tokens_read(batches) -> collections.Counter:
    """Every token the batches feed the model: rows do not repeat input tokens (a row's last label is
    the next row's first input), padding (id 0, label -100) left out."""
    counter = collections.Counter()
    for batch in batches:
        ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        real = ~((ids == 0) & (labels == -100))
        counter.update(ids[real].tolist())
    return counter


def make(paths, world, workers, rank, **extra):
    return PackedLoader(list(paths), seq_len=8, batch_size=2, world_size=world, num_workers=workers, rank=rank,
                        seed=5, loop=False, weights=[0.7, 0.3][:len(paths)], **extra)


@pytest.mark.parametrize("before, after", [((2, 0), (3, 0)), ((2, 0), (1, 0)), ((1, 0), (2, 2)), ((3, 2), (2, 0))])
@pytest.mark.parametrize("blend", [False, True])
def test_one_pass_reads_every_token_once_across_a_reshard(sources, before, after, blend):
    (a, docs_a), (b, docs_b) = sources
    paths = [a, b] if blend else [a]
    docs = docs_a + docs_b if blend else docs_a
    read = collections.Counter()
    states = []
    for rank in range(before[0]):  # each old rank reads a few batches (cut mid-document), then saves
        loader = make(paths, *before, rank)
        it = iter(loader)
        read += tokens_read(itertools.islice(it, 3 + rank))
        states.append(json.loads(json.dumps(loader.state_dict())))
    for rank in range(after[0]):
        loader = make(paths, *after, rank)
        loader.resume_from(states)
        read += tokens_read(loader)  # to the end of the pass
    assert read == collections.Counter(np.concatenate(docs).tolist())


def test_same_layout_resumes_exactly_and_a_different_one_is_checked(sources):
    (a, _), _ = sources
    loader = make([a], 2, 0, 1)
    it = iter(loader)
    next(it)
    states = [make([a], 2, 0, 0).state_dict(), loader.state_dict()]
    want = [b["input_ids"] for b in itertools.islice(it, 3)]
    again = make([a], 2, 0, 1)
    again.resume_from(states)  # the same world size and workers: this rank's own state
    assert all((g["input_ids"] == w).all() for g, w in zip(itertools.islice(iter(again), 3), want))
    other_seed = PackedLoader([a], seq_len=8, batch_size=2, world_size=3, rank=0, seed=6, loop=False)
    with pytest.raises(ValueError, match="seed: saved 5, this loader 6"):
        other_seed.resume_from(states)
    with pytest.raises(ValueError, match="expected rank 1 of the 2 states"):
        make([a], 3, 0, 0).resume_from([states[0], states[0]])


def test_looping_streams_finish_the_epochs_they_started_then_the_new_plans_begin(sources):
    """Old slot 0 stopped in epoch 0, old slot 1 in epoch 1: after the reshard the inherited streams
    read the rest of epochs 0 and 1 of the old plans and the new slots' own plans start at epoch 2;
    each epoch is then every document exactly once."""
    (a, docs), _ = sources
    shards = resolve_source(a, "sources[0]")
    spec = LoaderSpec(num_slots=2, seed=5, split="train", val_fraction=0.0, shuffle_documents=True, loop=True,
                      sources=(shards,), weights=(1.0,), seq_len=8, batch_size=2, pad_id=0)
    per_epoch = collections.defaultdict(list)
    old = []
    for slot, docs_to_read in ((0, 4), (1, 17)):  # 23 documents over 2 slots: slot 1 passes into epoch 1
        stream = DocumentStream(shards, 0, slot, spec)
        for _ in range(docs_to_read):
            tokens = stream.remaining().copy()
            per_epoch[stream.epoch].append(tokens)
            stream.consume(len(tokens))
        old.append({"slot": slot, "rows": 0, "cursors": [stream.cursor()]})
        stream.close()
    assert [s["cursors"][0][0] for s in old] == [0, 1]
    new_spec = LoaderSpec(**{**spec.__dict__, "num_slots": 3})
    states = reshard_slots(old, new_spec, 3, 0, 3)
    assert [s["cursors"][0][0] for s in states] == [2, 2, 2]
    assert [[e["slot"] for e in s.get("inherited", [])] for s in states] == [[0], [1], []]
    for state in states:
        producer = SlotProducer(new_spec, state["slot"], json.loads(json.dumps(state)))
        chain = producer.streams[0].sequence  # under the interleaving lanes (interleave.py)
        while True:
            tokens = chain.remaining().copy()
            stream = getattr(chain, "current", chain)  # a slot that inherited nothing has a plain stream
            if stream is getattr(chain, "own", chain) and stream.epoch > 2:
                break
            per_epoch[stream.epoch].append(tokens)
            chain.consume(len(tokens))
        assert "inherited" not in producer.state()  # read: gone from the state
        producer.close()
    for epoch in (0, 1, 2):
        assert document_multiset(per_epoch[epoch]) == document_multiset(docs), epoch


def test_a_second_reshard_keeps_what_the_first_inherited(sources):
    (a, docs_a), _ = sources
    read, states = collections.Counter(), []
    for rank in range(3):
        loader = make([a], 3, 0, rank)
        read += tokens_read(itertools.islice(iter(loader), 2))
        states.append(loader.state_dict())
    middle = []
    for rank in range(2):  # 3 -> 2 ranks, a batch each: inherited streams still unread
        loader = make([a], 2, 0, rank)
        loader.resume_from(states)
        read += tokens_read(itertools.islice(iter(loader), 1))
        middle.append(loader.state_dict())
    assert any("inherited" in s for m in middle for s in m["slots"])
    for rank in range(4):  # 2 -> 4 ranks, to the end
        loader = make([a], 4, 0, rank)
        loader.resume_from(middle)
        read += tokens_read(loader)
    assert read == collections.Counter(np.concatenate(docs_a).tolist())
