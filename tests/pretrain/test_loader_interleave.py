"""Interleaved reading (loader/interleave.py): a long document no longer fills consecutive batches, the
rows of a batch come from different documents, and no document is lost or read twice by the lanes,
across resumes and reshards.

Every token of these corpora is unique (document j holds ids start_j, start_j + 1, ...), so a token
says which document and which position it is."""

import collections
import itertools
import json

import numpy as np
import pytest

from undertow.pretrain.loader import PackedLoader
from undertow.pretrain.loader.interleave import reopener
from undertow.pretrain.loader.slot import reshard_slots
from undertow.pretrain.loader.sources import resolve_source
from tests.pretrain.loader_data import write_shard_dir

LONG = 2000


def unique_documents(lengths: list[int]) -> list[np.ndarray]:
    starts = np.cumsum([1, *lengths[:-1]])  # no token is the pad id 0
    return [np.arange(s, s + n, dtype=np.uint16) for s, n in zip(starts, lengths)]


@pytest.fixture
def long_and_short(tmp_path):
    """One shard: 200 short documents (4-40 tokens) and one of LONG tokens among them (like one 755 KB
    source file in a corpus of small ones)."""
    rng = np.random.default_rng(3)
    lengths = [int(n) for n in rng.integers(4, 41, size=200)]
    lengths.insert(57, LONG)
    docs = unique_documents(lengths)
    path = str(tmp_path / "corpus")
    write_shard_dir(path, docs, [len(docs)])
    owner = np.zeros(sum(lengths) + 1, dtype=np.int64)
    for j, d in enumerate(docs):
        owner[d.astype(np.int64)] = j
    return path, docs, owner, 57


def long_share_per_window(batches, owner, long_doc: int, window: int) -> float:
    """The largest share of input tokens from the long document over `window` consecutive batches."""
    shares = [float(np.mean(owner[b["input_ids"].numpy()] == long_doc)) for b in batches]
    return max(np.mean(shares[i:i + window]) for i in range(len(shares) - window + 1))


def test_a_long_document_does_not_fill_consecutive_batches(long_and_short):
    """Reading one document to its end, the long one fills 2000 / (4 x 16) ~ 31 batches in a row (a share
    of 1 over any 8 of them: fails today's behaviour, interleave = 1). With 8 lanes it holds one lane, a
    row in 8; its lane may still be reading it when the next epoch deals it to a second lane (the
    others read the rest of the corpus meanwhile), so at most 2 rows in 8: bound 0.25 + a row's worth."""
    path, _, owner, long_doc = long_and_short
    kwargs = dict(sources=[path], seq_len=16, batch_size=4, seed=1)
    plain = list(itertools.islice(iter(PackedLoader(**kwargs, interleave=1)), 150))
    mixed = list(itertools.islice(iter(PackedLoader(**kwargs, interleave=8)), 150))
    assert long_share_per_window(plain, owner, long_doc, 8) == 1.0
    assert long_share_per_window(mixed, owner, long_doc, 8) <= 0.25 + 1 / 32
    for batch in mixed:  # each row starts in another document (lanes hold distinct documents)
        firsts = owner[batch["input_ids"][:, 0].numpy()]
        assert len(set(firsts.tolist())) == len(firsts)


def read_counts(batches) -> collections.Counter:
    """How often each token was an input (rows overlap by one token only through the labels)."""
    counts = collections.Counter()
    for b in batches:
        ids, labels = b["input_ids"].numpy(), b["labels"].numpy()
        counts.update(ids[~((ids == 0) & (labels == -100))].tolist())
    return counts


def check_every_document_read_whole(counts, states, path, docs):
    """Each document's read counts are k whole reads plus the open copies the states still hold: a
    copy cut at a resume or reshard and never finished, or read twice, breaks this."""
    shards = resolve_source(path, "sources[0]")
    open_from = collections.defaultdict(list)  # document -> offsets its open copies are read up to
    for state in states:
        for record in [*state["lanes"][0], *(state.get("pending") or [[]])[0]]:
            if record is None:
                continue
            settings = dict(num_slots=record["num_slots"], seed=SEED, split="train", val_fraction=0.0,
                            shuffle_documents=True, loop=True)
            from undertow.pretrain.loader.streams import StreamSettings
            tail = reopener(shards, 0, StreamSettings(**settings))(record["slot"], record["num_slots"], record["cursor"])
            first = int(tail[0])
            doc = next(j for j, d in enumerate(docs) if d[0] <= first <= d[-1])
            open_from[doc].append(first - int(docs[doc][0]))
    for j, d in enumerate(docs):
        per_token = np.array([counts[int(t)] for t in d])
        for offset in open_from[j]:
            per_token[:offset] -= 1
        assert (per_token == per_token[0]).all(), f"document {j}: reads {per_token.tolist()}"


SEED = 7


@pytest.fixture
def small_corpus(tmp_path):
    rng = np.random.default_rng(5)
    docs = unique_documents([int(n) for n in rng.integers(1, 60, size=37)])
    path = str(tmp_path / "small")
    write_shard_dir(path, docs, [9, 10, 8, 10])
    return path, docs


def test_lanes_read_every_document_whole_across_resume_and_reshard(small_corpus):
    path, docs = small_corpus

    def make(world, workers, rank, k):
        return PackedLoader([path], seq_len=8, batch_size=2, world_size=world, num_workers=workers, rank=rank,
                            seed=SEED, interleave=k)

    batches, states = [], []
    for rank in range(2):  # 2 ranks x 2 workers, 4 lanes: 13 batches each (into the second epoch)
        loader = make(2, 2, rank, 4)
        batches += itertools.islice(iter(loader), 13)
        states.append(json.loads(json.dumps(loader.state_dict())))
    slots = [s for state in states for s in state["slots"]]
    check_every_document_read_whole(read_counts(batches), slots, path, docs)
    assert any(lane is not None for s in slots for lane in s["lanes"][0])  # documents were open

    after = []
    for rank in range(3):  # resharded to 3 ranks in process, 3 lanes: the open documents become pending
        loader = make(3, 0, rank, 3)
        loader.resume_from(states)
        after += itertools.islice(iter(loader), 11)
        after_states = loader.state_dict()["slots"]
        slots_after = after_states if rank == 0 else slots_after + after_states
    check_every_document_read_whole(read_counts(batches + after), slots_after, path, docs)


def test_pending_documents_survive_a_reshard():
    """reshard_slots hands the old slots' open documents to the new slot inheriting their stream."""
    from undertow.pretrain.loader.slot import LoaderSpec
    spec = LoaderSpec(num_slots=2, seed=0, split="train", val_fraction=0.0, shuffle_documents=True, loop=True,
                      sources=(None,), weights=(1.0,), seq_len=8, batch_size=2, pad_id=0, interleave=2)
    rec = lambda s, d: {"slot": s, "num_slots": 3, "cursor": [0, 0, d, 1]}  # noqa: E731
    old = [{"slot": k, "rows": 4, "cursors": [[0, 1, 0, 0]], "lanes": [[rec(k, 1), None]],
            **({"pending": [[rec(k, 5)]]} if k == 2 else {})} for k in range(3)]
    states = reshard_slots(old, spec, 2, 0, 2)
    pending = [s.get("pending", [[]])[0] for s in states]
    assert pending == [[rec(0, 1), rec(2, 1), rec(2, 5)], [rec(1, 1)]]
