"""The embedded corpus file, its build script, and the cached embedded dataset."""

import gzip
import importlib.util
import json
import os

import pytest

from undertow.data_prep import corpus as corpus_mod
from undertow.data_prep.corpus import EMBEDDED_CORPUS, ensure_embedded_dataset
from undertow.data_prep.format import read_manifest
from undertow.data_prep.tokenizer import Tokenizer

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "make_embedded_corpus.py")


def test_corpus_file_and_its_script_are_deterministic(tmp_path):
    raw = open(EMBEDDED_CORPUS, "rb").read()
    assert raw[4:8] == b"\0\0\0\0" and len(raw) < 500_000  # gzip mtime 0; small
    records = [json.loads(line) for line in gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8")]
    assert len(records) > 100 and all(set(r) == {"text", "topic"} and r["text"].strip() for r in records)
    topics = [r["topic"] for r in records]
    assert topics == sorted(topics)

    spec = importlib.util.spec_from_file_location("make_embedded_corpus", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    script.build(str(a))
    script.build(str(b))
    assert a.read_bytes() == b.read_bytes()
    long_topic = "\n\n".join(f"paragraph {i} " + "words " * 60 for i in range(40))
    assert all(len(d) <= script.MAX_CHARS + script.MIN_CHARS for d in script.split_topic(long_topic))
    assert "\n\n".join(script.split_topic(long_topic)) == long_topic  # cut at paragraphs, nothing lost


def test_embedded_dataset_builds_once_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERTOW_CACHE", str(tmp_path / "cache"))
    directory = ensure_embedded_dataset(vocab_size=512, shard_tokens=32768)
    assert directory.startswith(str(tmp_path / "cache"))
    m = read_manifest(directory)
    assert m["complete"] and len(m["shards"]) >= 2 and m["documents"] > 100 and m["skipped"] == {}
    assert m["tokenizer"]["file"] == "tokenizer.model" and m["tokenizer"]["vocab_size"] == 512
    assert Tokenizer.load(os.path.join(directory, m["tokenizer"]["file"])).sha256 == m["tokenizer"]["sha256"]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached dataset was rebuilt")

    monkeypatch.setattr(corpus_mod, "_build", no_rebuild)
    assert ensure_embedded_dataset(str(tmp_path / "cache"), vocab_size=512, shard_tokens=32768) == directory
    assert os.listdir(os.path.dirname(directory)) == [os.path.basename(directory)]  # no temp dirs left


def test_a_failed_build_leaves_nothing_that_looks_done(tmp_path, monkeypatch):
    from undertow.data_prep import shards

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while preparing shards")

    monkeypatch.setattr(shards, "prepare_shards", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_embedded_dataset(str(tmp_path), vocab_size=400, shard_tokens=1 << 20)
    assert os.listdir(tmp_path / "embedded") == []
    monkeypatch.undo()
    directory = ensure_embedded_dataset(str(tmp_path), vocab_size=400, shard_tokens=1 << 20)
    assert read_manifest(directory)["complete"] and len(read_manifest(directory)["shards"]) == 1
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        ensure_embedded_dataset(str(tmp_path), vocab_size=0)
