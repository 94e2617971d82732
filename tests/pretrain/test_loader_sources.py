"""PackedLoader sources: directories, brace/glob patterns, pipe: URLs, megatron:PREFIX, and bad input."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from undertow.pretrain.loader import sources as loader_sources
from undertow.pretrain.loader import PackedLoader
from undertow.pretrain.loader.sources import ShardReadError
from tests.pretrain.loader_data import (
    document_multiset,
    documents_from_batches,
    random_documents,
    write_shard_dir,
)

TOKENIZER = {"file": "tok.model", "sha256": "abc", "vocab_size": 1000, "bos_id": 1, "eos_id": 2, "pad_id": 3}


@pytest.fixture
def shard_dir(tmp_path):
    directory = str(tmp_path / "data")
    docs = random_documents(20, seed=20)
    write_shard_dir(directory, docs, [7, 6, 7], tokenizer=TOKENIZER)
    return directory, docs


def all_documents(loader: PackedLoader) -> list:
    return document_multiset(d for s in range(loader.num_slots) for d in documents_from_batches(loader.iter_slot(s)))


def batches_of(source: str) -> list[dict]:
    return list(PackedLoader([source], seq_len=8, batch_size=2, loop=False, seed=4))


def test_patterns_and_pipes_read_what_the_directory_reads(shard_dir):
    directory, docs = shard_dir
    want = batches_of(directory)
    shards = os.path.join(directory, "shard-{000000..000002}.tar")
    for source in (shards, os.path.join(directory, "*.tar"), f"pipe:cat {shards}"):
        got = batches_of(source)
        assert len(got) == len(want), source
        for g, w in zip(got, want):  # (input_ids may differ in padding: only the directory knows pad_id)
            assert all(torch.equal(g[k], w[k]) for k in ("labels", "position_ids", "doc_ids", "cu_seqlens")), source
    assert document_multiset(documents_from_batches(want, pad_id=TOKENIZER["pad_id"])) == document_multiset(docs)


def test_pipe_closed_early_is_fine_and_a_failing_pipe_is_loud(tmp_path):
    big = str(tmp_path / "big")  # ~200 kB: more than a pipe buffer, so `cat` is still writing when we stop
    write_shard_dir(big, random_documents(50, min_len=2000, max_len=2000), [50])
    loader = PackedLoader([f"pipe:cat {big}/shard-000000.tar"], seq_len=4, batch_size=1, shuffle_documents=False)
    it = iter(loader)
    assert next(it)["input_ids"].shape == (1, 4)
    it.close()  # stops reading mid-shard: the command dies of SIGPIPE, which is expected here
    broken = PackedLoader([f"pipe:cat {tmp_path}/missing.tar"], seq_len=4, batch_size=1)
    with pytest.raises(ShardReadError, match="missing.tar"):
        next(iter(broken))


def test_corrupt_shard_is_loud(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(b"not a tar file" * 100)
    with pytest.raises(ShardReadError, match="bad.tar"):
        next(iter(PackedLoader([str(path)], seq_len=4, batch_size=1)))


@pytest.mark.filterwarnings("ignore::UserWarning")  # megatron-core's import warns about optional packages
def test_megatron_source(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "mega")
    docs = random_documents(23, seed=21, min_len=2)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i, doc in enumerate(docs):
        if i % 3 == 0:  # a document stored as two sequences is still one document
            builder.add_item(torch.from_numpy(doc[:1].astype(np.int64)))
            builder.add_item(torch.from_numpy(doc[1:].astype(np.int64)))
        else:
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")

    monkeypatch.setattr(loader_sources, "MEGATRON_DOCS_PER_SHARD", 5)  # 5 virtual shards over 4 slots
    loader = PackedLoader([f"megatron:{prefix}"], seq_len=8, batch_size=2, world_size=2, num_workers=2, loop=False)
    assert all_documents(loader) == document_multiset(docs)
    assert loader.vocab_info() is None
    with open(f"{prefix}.json", "w") as f:  # the record `undertow prep megatron` writes beside .bin/.idx
        json.dump({"tokenizer": {"vocab_size": 321, "pad_id": 3}}, f)
    assert PackedLoader([f"megatron:{prefix}"], seq_len=8, batch_size=2).vocab_info() == {"vocab_size": 321, "pad_id": 3}

    monkeypatch.setitem(sys.modules, "megatron.core.datasets.indexed_dataset", None)
    with pytest.raises(ImportError, match="needs megatron-core"):
        PackedLoader([f"megatron:{prefix}"], seq_len=8, batch_size=2)


def test_vocab_info_and_mismatched_tokenizers(shard_dir, tmp_path):
    directory, _ = shard_dir
    assert PackedLoader([directory], seq_len=4, batch_size=1).vocab_info() == TOKENIZER
    pattern_loader = PackedLoader([os.path.join(directory, "*.tar")], seq_len=4, batch_size=1)
    assert pattern_loader.vocab_info() == TOKENIZER  # read from the manifest beside the shards
    other = str(tmp_path / "other")
    write_shard_dir(other, random_documents(3), [3], tokenizer={**TOKENIZER, "sha256": "def"})
    with pytest.raises(ValueError, match="tokenized differently"):
        PackedLoader([directory, other], seq_len=4, batch_size=1)


def test_one_pass_pads_with_the_manifest_pad_id(shard_dir):
    directory, _ = shard_dir
    last = list(PackedLoader([directory], seq_len=7, batch_size=3, loop=False))[-1]
    assert (last["input_ids"][last["labels"] == -100] == TOKENIZER["pad_id"]).any()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(sources=[]), "sources=.*non-empty list"),
        (dict(sources=["{tmp}/nowhere"]), r"sources\[0\]=.*no such file or directory"),
        (dict(sources=["{tmp}/*.tar"]), r"sources\[0\]=.*matches no file"),
        (dict(sources=["{data}/shard-{{000000..000005}}.tar"]), "no such file.*shard-000003.tar"),
        (dict(sources=["{data}/shard-00000{{0,0}}.tar"]), "listed more than once"),
        (dict(sources=["{tmp}"]), "has no manifest.json"),
        (dict(sources=["ftp2://host/x.tar"]), "unknown URL scheme 'ftp2'"),
        (dict(sources=["megatron:{tmp}/none"]), "PREFIX.bin and PREFIX.idx"),
        (dict(weights=[1.0, 2.0]), "weights=.*one weight per source"),
        (dict(weights=[-1.0]), "weights=.*>= 0"),
        (dict(weights=[0.0]), "weights=.*at least one"),
        (dict(seq_len=1), "seq_len=1: expected an int >= 2"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(rank=2, world_size=2), r"rank=2: expected an int in \[0, world_size=2\)"),
        (dict(num_workers=-1), "num_workers=-1"),
        (dict(split="test"), "split='test': expected 'train' or 'val'"),
        (dict(val_fraction=1.0), "val_fraction=1.0"),
        (dict(split="val"), "split='val' needs val_fraction > 0"),
    ],
)
def test_bad_arguments_fail_before_any_work(shard_dir, tmp_path, change, message):
    directory, _ = shard_dir
    kwargs = dict(sources=[directory], seq_len=4, batch_size=1)
    if "sources" in change:
        change = {"sources": [s.format(tmp=tmp_path, data=directory) for s in change["sources"]]}
    with pytest.raises(ValueError, match=message):
        PackedLoader(**{**kwargs, **change})


def test_manifest_listing_a_missing_shard(shard_dir):
    directory, _ = shard_dir
    os.remove(os.path.join(directory, "shard-000001.tar"))
    with pytest.raises(ValueError, match="missing.*shard-000001.tar"):
        PackedLoader([directory], seq_len=4, batch_size=1)
