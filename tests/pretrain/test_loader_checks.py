"""Shards checked against their manifest before compute is spent: the size of every shard when the
sources are resolved (before the model is built), the sha256 of each shard the first time a process
reads it whole. Each failure is one line that names the file, what differed and what to do."""

import itertools
import os

import pytest

from undertow.pretrain.loader import PackedLoader, ShardReadError, resolve_source
from tests.pretrain.loader_data import random_documents, write_shard_dir


@pytest.fixture
def shard_dir(tmp_path):
    path = str(tmp_path / "data")
    shards = write_shard_dir(path, random_documents(12, seed=4, max_len=30), [6, 6])
    return path, shards


def test_a_truncated_shard_is_refused_when_the_sources_are_resolved(shard_dir):
    path, shards = shard_dir
    size = os.path.getsize(shards[1])
    os.truncate(shards[1], size - 512)
    with pytest.raises(ValueError) as e:
        resolve_source(path, "data.sources[0]")
    message = str(e.value)
    assert "\n" not in message and shards[1] in message and f"{size - 512} bytes" in message
    assert f"says {size}" in message and "re-run that command" in message


def test_an_altered_shard_is_refused_when_first_read(shard_dir):
    path, shards = shard_dir
    data = bytearray(open(shards[0], "rb").read())
    magic = data.index(b"\x93NUMPY")  # the first token array: flip a bit of its first token
    start = magic + 10 + int.from_bytes(data[magic + 8:magic + 10], "little")
    data[start] ^= 0x01  # same size, the tar and the array still parse
    open(shards[0], "wb").write(bytes(data))
    loader = PackedLoader([path], seq_len=8, batch_size=2, shuffle_documents=True)
    with pytest.raises(ShardReadError, match="shard-000000.tar.*sha256.*re-run `undertow prep shards`"):
        list(itertools.islice(iter(loader), 40))


def test_intact_shards_are_hashed_once_per_process(shard_dir, monkeypatch):
    path, _ = shard_dir
    shards = resolve_source(path, "sources[0]")
    for _ in range(2):
        for i in range(len(shards)):
            docs = shards.documents(i)
            assert len(list(docs)) == 6
    assert shards._verified == {0, 1}


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_altered_after_the_start_stops_the_run_with_one_line(shard_dir, capsys, tmp_path, workers):
    from undertow.cli import main

    from .helpers import cli_args

    path, shards = shard_dir
    data = bytearray(open(shards[1], "rb").read())
    magic = data.index(b"\x93NUMPY")
    data[magic + 10 + int.from_bytes(data[magic + 8:magic + 10], "little")] ^= 0x01
    open(shards[1], "wb").write(bytes(data))
    args = cli_args(tmp_path / "run", **{"data.sources": path, "model.vocab_size": 1000, "training.steps": 20,
                                         "data.num_workers": workers, "data.val_fraction": 0.0})
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "shard-000001.tar" in err[0] and "sha256" in err[0]
