"""Megatron .bin/.idx: written from inputs and from shards, read back through megatron-core."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from undertow.data_prep.format import read_manifest, read_shard
from undertow.data_prep.megatron import megatron_from_shards, open_megatron, write_megatron
from undertow.data_prep.shards import prepare_shards

from .conftest import write_jsonl

needs_megatron = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")


@needs_megatron
def test_round_trip_through_indexed_dataset(tmp_path, corpus, tokenizer_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"text": "one more document"}])
    shard_dir = str(tmp_path / "shards")
    prepare_shards([corpus, bad], tokenizer_path, shard_dir, shard_tokens=700, progress=False)
    manifest = read_manifest(shard_dir)
    expected = [d.tokens for s in manifest["shards"] for d in read_shard(open(os.path.join(shard_dir, s["file"]), "rb"))]

    direct = str(tmp_path / "mega" / "direct")
    record = write_megatron([corpus, bad], tokenizer_path, direct, workers=2, progress=False)
    converted = str(tmp_path / "mega" / "converted")
    megatron_from_shards(shard_dir, converted, progress=False)

    for prefix in (direct, converted):
        ds = open_megatron(prefix)
        assert len(ds) == len(expected) == manifest["documents"]
        assert np.array_equal(ds.document_indices, np.arange(len(expected) + 1))  # one sequence per document
        for i, tokens in enumerate(expected):
            assert np.array_equal(ds[i], tokens) and ds[i].dtype == np.uint16
        saved = json.load(open(f"{prefix}.json"))
        assert (saved["documents"], saved["tokens"]) == (manifest["documents"], manifest["tokens"])
        assert saved["skipped"] == manifest["skipped"] == {"jsonl line is not json": 1}
        assert saved["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
        assert os.path.isfile(saved["tokenizer"]["file"])
    assert record["documents"] == manifest["documents"]
    for ext in (".bin", ".idx"):
        assert open(direct + ext, "rb").read() == open(converted + ext, "rb").read()
    assert not [n for n in os.listdir(tmp_path / "mega") if n.endswith(".tmp")]


@needs_megatron
def test_clear_errors(tmp_path, corpus, tokenizer_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no Megatron dataset at"):
        open_megatron(str(tmp_path / "nothing"))
    unfinished = tmp_path / "unfinished"
    prepare_shards([corpus], tokenizer_path, str(unfinished), progress=False)
    manifest = json.load(open(unfinished / "manifest.json"))
    manifest["complete"] = False
    json.dump(manifest, open(unfinished / "manifest.json", "w"))
    with pytest.raises(ValueError, match="unfinished prep"):
        megatron_from_shards(str(unfinished), str(tmp_path / "m"), progress=False)

    monkeypatch.setitem(sys.modules, "megatron.core.datasets", None)  # as if megatron-core were not installed
    with pytest.raises(ImportError, match=r"pip install 'undertow\[megatron\]'"):
        write_megatron([corpus], tokenizer_path, str(tmp_path / "m"), progress=False)
