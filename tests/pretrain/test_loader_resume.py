"""PackedLoader state: a rebuilt loader loaded with a state continues with exactly the next batches."""

import itertools
import json

import numpy as np
import pytest
import torch

from undertow.pretrain.loader import PackedLoader
from tests.pretrain.loader_data import random_documents, write_shard_dir


@pytest.fixture
def two_sources(tmp_path):
    """Two small sources with disjoint token ranges, a few shards each."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_shard_dir(a, random_documents(14, seed=10, max_len=25), [5, 4, 5])
    write_shard_dir(b, random_documents(9, seed=11, max_len=25, low=2000, high=3000), [3, 3, 3])
    return a, b


def take(iterator, n: int) -> list[dict]:
    return list(itertools.islice(iterator, n))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert torch.equal(g[key], w[key]) if isinstance(w[key], torch.Tensor) else g[key] == w[key], key


def resumed(kwargs: dict, state: dict) -> PackedLoader:
    loader = PackedLoader(**kwargs)
    loader.load_state_dict(json.loads(json.dumps(state)))  # states travel as JSON
    return loader


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("interleave", [1, 3])
def test_resume_continues_exactly(two_sources, num_workers, blend, interleave):
    kwargs = dict(
        interleave=interleave,
        sources=list(two_sources) if blend else [two_sources[0]],
        weights=[0.6, 0.4] if blend else None,
        seq_len=8,
        batch_size=2,
        num_workers=num_workers,
        seed=3,
        shuffle_documents=not blend,  # both orders: shuffled (shard held in memory) and streamed
    )
    reference = take(iter(PackedLoader(**kwargs)), 30)

    first = PackedLoader(**kwargs)
    it = iter(first)
    assert_same_batches(take(it, 7), reference[:7])
    state = first.state_dict()
    assert_same_batches(take(it, 2), reference[7:9])  # the live loader is not disturbed by saving
    assert_same_batches(take(iter(first), 3), reference[9:12])  # a new iter() continues where the last stopped
    with pytest.raises(RuntimeError, match="replaced by a newer iter"):
        next(it)  # two live cursors would corrupt the state

    second = resumed(kwargs, state)
    it = iter(second)
    assert_same_batches(take(it, 11), reference[7:18])
    third = resumed(kwargs, second.state_dict())  # resuming a resumed run
    assert_same_batches(take(iter(third), 12), reference[18:30])

    cursors = [c for slot in third.state_dict()["slots"] for c in slot["cursors"]]
    assert any(epoch >= 2 for epoch, *_ in cursors)  # the runs crossed epoch boundaries


@pytest.mark.parametrize("interleave", [1, 3])
def test_resume_mid_document_and_mid_shard(two_sources, interleave):
    kwargs = dict(sources=[two_sources[0]], seq_len=8, batch_size=1, shuffle_documents=False, interleave=interleave)
    reference = take(iter(PackedLoader(**kwargs)), 40)
    loader, resumes = PackedLoader(**kwargs), []
    it = iter(loader)
    for step in range(40):  # resume after every batch: covers every cursor position on the way
        (batch,) = take(it, 1)
        assert_same_batches([batch], [reference[step]])
        state = loader.state_dict()
        # where the open documents stand (the lanes of interleave.py)
        resumes += [tuple(lane["cursor"][1:]) for lane in state["slots"][0]["lanes"][0] if lane is not None]
        loader = resumed(kwargs, state)
        it = iter(loader)
    assert any(doc > 0 and offset > 0 for _, doc, offset in resumes)  # inside a document, not the first of a shard


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_val_pass(two_sources, num_workers):
    kwargs = dict(
        sources=list(two_sources), seq_len=8, batch_size=2, num_workers=num_workers, split="val", val_fraction=0.5
    )
    reference = list(PackedLoader(**kwargs))
    assert len(reference) > 4
    loader = PackedLoader(**kwargs)
    head = take(iter(loader), 3)
    rest = list(resumed(kwargs, loader.state_dict()))
    assert_same_batches(head + rest, reference)
    assert_same_batches(list(loader), reference)  # each iter() of a val loader is a fresh pass


def test_state_is_plain_json(two_sources):
    loader = PackedLoader(list(two_sources), seq_len=8, batch_size=2, weights=[1, 2], val_fraction=0.1)
    take(iter(loader), 3)
    state = loader.state_dict()

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return isinstance(x, (int, str)) and not isinstance(x, (bool, np.integer))

    assert plain(state) and json.loads(json.dumps(state)) == state


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(world_size=2), "world_size: saved 1, this loader 2"),
        (dict(num_workers=2), "num_workers: saved 0, this loader 2"),
        (dict(seed=5), "seed: saved 0"),
        (dict(split="val", val_fraction=0.5), "split: saved 'train'"),
        (dict(sources="swap"), r"sources\[0\]: saved"),
        (dict(sources="one"), "sources: saved"),
    ],
)
def test_state_from_another_setup_is_refused(two_sources, change, message):
    kwargs = dict(sources=list(two_sources), seq_len=8, batch_size=2)
    state = PackedLoader(**kwargs).state_dict()
    if change.get("sources") == "swap":
        change = dict(sources=list(reversed(two_sources)))
    elif change.get("sources") == "one":
        change = dict(sources=[two_sources[0]])
    with pytest.raises(ValueError, match=message):
        PackedLoader(**{**kwargs, **change}).load_state_dict(state)


def test_malformed_state_is_refused(two_sources):
    loader = PackedLoader([two_sources[0]], seq_len=8, batch_size=2)
    good = loader.state_dict()
    with pytest.raises(ValueError, match="not a PackedLoader state"):
        loader.load_state_dict({"step": 3})
    bad_cursor = json.loads(json.dumps(good))
    bad_cursor["slots"][0]["cursors"][0] = [0, -1, 0, 0]
    with pytest.raises(ValueError, match="'cursors' must be 1 lists"):
        loader.load_state_dict(bad_cursor)
    other_rank = PackedLoader([two_sources[0]], seq_len=8, batch_size=2, world_size=2, rank=1).state_dict()
    with pytest.raises(ValueError, match="rank: saved 1, this loader 0"):
        PackedLoader([two_sources[0]], seq_len=8, batch_size=2, world_size=2, rank=0).load_state_dict(other_rank)
