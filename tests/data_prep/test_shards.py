"""prepare_shards: byte determinism (runs, worker counts), manifest contents, resume, conflicts, skips."""

import os

import numpy as np
import pytest

from undertow.data_prep import shards as shards_mod
from undertow.data_prep import sources as S
from undertow.data_prep.format import read_manifest, read_shard, sha256_file
from undertow.data_prep.pipeline import summary_line
from undertow.data_prep.shards import prepare_shards
from undertow.data_prep.tokenizer import Tokenizer, train_tokenizer

from .conftest import make_texts, write_jsonl

SHARD_TOKENS = 800


def dir_bytes(directory) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def read_docs(directory):
    manifest = read_manifest(directory)
    return [doc for s in manifest["shards"] for doc in read_shard(open(os.path.join(directory, s["file"]), "rb"))]


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> str:
    """60 documents with a bad line after every 7th, so skips fall on both sides of any shard end."""
    records = []
    for i, text in enumerate(make_texts(60, seed=3)):
        records.append({"text": text})
        if i % 7 == 6:
            records.append(["{broken", {"text": 1}, {"text": " "}][i % 3])
    return write_jsonl(tmp_path_factory.mktemp("messy") / "messy.jsonl", records)


def test_identical_bytes_across_runs_and_worker_counts(tmp_path, corpus, messy, tokenizer_path):
    outs = []
    for run, workers in enumerate([1, 1, 2]):
        out = str(tmp_path / f"run{run}")
        prepare_shards([corpus, messy], tokenizer_path, out, shard_tokens=SHARD_TOKENS, workers=workers,
                       progress=False)
        outs.append(dir_bytes(out))
    assert len([n for n in outs[0] if n.startswith("shard-")]) >= 3
    assert outs[0] == outs[1] == outs[2]


def test_manifest_and_shard_contents(tmp_path, corpus, tokenizer_path):
    out = str(tmp_path / "out")
    returned = prepare_shards([corpus], tokenizer_path, out, shard_tokens=SHARD_TOKENS, progress=False)
    m = read_manifest(out)
    assert m == returned and m["complete"] and m["dtype"] == "uint16" and m["skipped"] == {}
    tok = Tokenizer.load(os.path.join(out, m["tokenizer"]["file"]))
    assert m["tokenizer"] == tok.describe("tokenizer.model") and tok.sha256 == sha256_file(tokenizer_path)
    assert m["settings"]["tokenizer_sha256"] == tok.sha256 and m["settings"]["shard_tokens"] == SHARD_TOKENS
    assert "workers" not in m["settings"]

    shards = m["shards"]
    assert [s["file"] for s in shards] == [f"shard-{i:06d}.tar" for i in range(len(shards))]
    assert sum(s["documents"] for s in shards) == m["documents"] == 120
    assert sum(s["tokens"] for s in shards) == m["tokens"]
    assert [s["inputs_consumed"] for s in shards] == list(np.cumsum([s["documents"] for s in shards]))
    assert all(s["tokens"] >= SHARD_TOKENS for s in shards[:-1])
    for s in shards:
        path = os.path.join(out, s["file"])
        assert s["bytes"] == os.path.getsize(path) and s["sha256"] == sha256_file(path)

    texts = [r["text"] for r in map(__import__("json").loads, open(corpus))]
    docs = read_docs(out)
    assert [d.key for d in docs] == [f"{i:012d}" for i in range(120)]
    for i, doc in enumerate(docs):
        assert doc.tokens.dtype == np.uint16 and doc.tokens[-1] == tok.eos_id
        assert doc.meta == {"source": corpus, "index": i, "tokens": len(doc.tokens)}
        assert tok.decode(doc.tokens[:-1]) == texts[i]  # lossless, in input order


def test_bos_without_eos(tmp_path, corpus, tokenizer_path):
    out = str(tmp_path / "out")
    prepare_shards([corpus], tokenizer_path, out, add_bos=True, append_eos=False, dtype="uint32", progress=False)
    docs = read_docs(out)
    assert all(d.tokens[0] == 1 and d.tokens[-1] != 2 and d.tokens.dtype == np.uint32 for d in docs)


class SimulatedCrash(Exception):
    pass


@pytest.mark.parametrize("crash_at", ["inside shard 2", "before the manifest says complete"])
def test_resume_is_byte_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, corpus, messy, tokenizer_path,
                                                          crash_at):
    args = ([messy, corpus], tokenizer_path)
    reference = str(tmp_path / "reference")
    prepare_shards(*args, reference, shard_tokens=SHARD_TOKENS, progress=False)

    if crash_at == "inside shard 2":
        real_write_shard, calls = shards_mod.write_shard, []

        def write_shard(f, docs):
            calls.append(1)
            if len(calls) == 2:  # shard 1 is done; leave half a shard-000001.tar.tmp behind
                next(iter(docs))
                f.write(b"half a shard")
                raise SimulatedCrash
            return real_write_shard(f, docs)

        monkeypatch.setattr(shards_mod, "write_shard", write_shard)
    else:
        real_write_json = shards_mod.write_json_atomic

        def write_json_atomic(path, obj):
            if obj["complete"]:
                raise SimulatedCrash
            real_write_json(path, obj)

        monkeypatch.setattr(shards_mod, "write_json_atomic", write_json_atomic)

    out = str(tmp_path / "out")
    with pytest.raises(SimulatedCrash):
        prepare_shards(*args, out, shard_tokens=SHARD_TOKENS, progress=False)
    monkeypatch.undo()
    crashed = read_manifest(out)
    assert not crashed["complete"] and crashed["shards"]
    first = os.stat(os.path.join(out, "shard-000000.tar"))
    if crash_at == "inside shard 2":
        assert len(crashed["shards"]) == 1 and os.path.exists(os.path.join(out, "shard-000001.tar.tmp"))
        assert crashed["skipped"] and sum(crashed["skipped"].values()) < sum(read_manifest(reference)["skipped"].values())

    prepare_shards(*args, out, shard_tokens=SHARD_TOKENS, workers=2, progress=False)
    assert dir_bytes(out) == dir_bytes(reference)  # no .tmp left, nothing duplicated or dropped
    again = os.stat(os.path.join(out, "shard-000000.tar"))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # finished shards kept


def test_existing_directory_rules(tmp_path, corpus, tokenizer_path, undertow_logs):
    out = str(tmp_path / "out")
    prepare_shards([corpus], tokenizer_path, out, shard_tokens=SHARD_TOKENS, progress=False)
    before = dir_bytes(out)
    prepare_shards([corpus], tokenizer_path, out, shard_tokens=SHARD_TOKENS, workers=3, progress=False)
    assert "already complete" in undertow_logs.text and dir_bytes(out) == before

    with pytest.raises(ValueError, match=r"different settings \(shard_tokens: 800 -> 900\).*--overwrite"):
        prepare_shards([corpus], tokenizer_path, out, shard_tokens=900, progress=False)
    other = str(tmp_path / "other.model")
    train_tokenizer(make_texts(300, seed=2), other, vocab_size=390)
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        prepare_shards([corpus], other, out, shard_tokens=SHARD_TOKENS, progress=False)

    prepare_shards([corpus], other, out, shard_tokens=900, overwrite=True, progress=False)
    fresh = str(tmp_path / "fresh")
    prepare_shards([corpus], other, fresh, shard_tokens=900, progress=False)
    assert dir_bytes(out) == dir_bytes(fresh)

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "shard-000000.tar").write_bytes(b"?")
    with pytest.raises(ValueError, match="holds shard files but no manifest.json"):
        prepare_shards([corpus], tokenizer_path, str(stray), progress=False)


def test_skips_are_counted_in_manifest_and_summary(tmp_path, monkeypatch, messy, tokenizer_path):
    real_encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: [] if "forget" in text else real_encode(self, text))
    m = prepare_shards([messy], tokenizer_path, str(tmp_path / "out"), progress=False)  # workers=1: patch applies
    assert m["skipped"] == {S.NOT_JSON: 3, S.NOT_STRING: 3, S.EMPTY: 2,
                            S.EMPTY_AFTER_TOKENIZATION: sum("forget" in t for t in make_texts(60, seed=3))}
    assert m["documents"] == 60 - m["skipped"][S.EMPTY_AFTER_TOKENIZATION]
    line = summary_line(m["documents"], m["tokens"], m["skipped"], len(m["shards"]))
    assert "jsonl line is not json: 3" in line and "empty after tokenization" in line


def test_errors_before_any_work(tmp_path, corpus, tokenizer_path):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    proto.ParseFromString(open(tokenizer_path, "rb").read())
    for i in range(70_000 - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.type = f"<extra_{i}>", pb.ModelProto.SentencePiece.USER_DEFINED
    big = tmp_path / "big.model"
    big.write_bytes(proto.SerializeToString())

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="dtype 'uint16' holds token ids below 65536.*vocab_size is 70000"):
        prepare_shards([corpus], str(big), str(out), dtype="uint16", progress=False)
    assert not out.exists()
    no_eos = str(tmp_path / "no_eos.model")
    train_tokenizer(make_texts(50), no_eos, vocab_size=300, eos_id=-1)
    with pytest.raises(ValueError, match="append_eos is set but .* has no EOS"):
        prepare_shards([corpus], no_eos, str(out), progress=False)
    with pytest.raises(ValueError, match="shard_tokens must be a positive integer"):
        prepare_shards([corpus], tokenizer_path, str(out), shard_tokens=0, progress=False)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        prepare_shards([corpus], tokenizer_path, str(out), workers=0, progress=False)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare_shards([str(tmp_path / "*.jsonl")], tokenizer_path, str(out), progress=False)
    assert not out.exists()

    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"text": ""}])
    with pytest.raises(ValueError, match="every input document was skipped"):
        prepare_shards([only_bad], tokenizer_path, str(out), progress=False)


def test_uint32_for_a_big_vocabulary(tmp_path, corpus, tokenizer_path, monkeypatch):
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70_000))
    m = prepare_shards([corpus], tokenizer_path, str(tmp_path / "out"), progress=False)
    assert m["dtype"] == "uint32" and read_docs(str(tmp_path / "out"))[0].tokens.dtype == np.uint32


@pytest.mark.parametrize("damage", ["truncated", "altered", "missing"])
def test_a_rerun_rewrites_damaged_shards_and_keeps_the_others(tmp_path, corpus, messy, tokenizer_path, damage):
    """A shard damaged after a complete run (cut, bytes flipped at the same size, deleted): the loader
    refuses it (tests/pretrain/test_loader_checks.py), and re-running the same command rewrites it and
    everything after it from the inputs, byte-identical, keeping the shards before it."""
    args = ([messy, corpus], tokenizer_path)
    out = str(tmp_path / "out")
    prepare_shards(*args, out, shard_tokens=SHARD_TOKENS, progress=False)
    reference = dir_bytes(out)
    assert len(read_manifest(out)["shards"]) >= 3
    target = os.path.join(out, "shard-000001.tar")
    if damage == "truncated":
        os.truncate(target, os.path.getsize(target) // 2)
    elif damage == "altered":
        data = bytearray(open(target, "rb").read())
        data[700] ^= 0xFF
        open(target, "wb").write(bytes(data))
    else:
        os.remove(target)
    first = os.stat(os.path.join(out, "shard-000000.tar"))
    prepare_shards(*args, out, shard_tokens=SHARD_TOKENS, progress=False)
    assert dir_bytes(out) == reference  # the manifest's skip counts included
    again = os.stat(os.path.join(out, "shard-000000.tar"))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_inputs_without_text_say_so_and_leave_nothing(tmp_path, tokenizer_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="hold no text.*nothing was written"):
        prepare_shards([empty], tokenizer_path, str(out), progress=False)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="hold no text"):
        prepare_shards([empty], tokenizer_path, str(existing), progress=False)
    assert sorted(os.listdir(existing)) == ["notes.txt"]


def test_a_small_corpus_gives_min_shards_and_long_documents_can_be_cut(tmp_path, corpus, tokenizer_path, undertow_logs):
    """Without --shard-tokens, a corpus far below min_shards x the default shard size is cut into
    about min_shards shards, and the log says why; max_doc_tokens cuts documents into pieces that
    stay together in one shard and rebuild the document."""
    out = str(tmp_path / "small")
    m = prepare_shards([corpus], tokenizer_path, out, min_shards=6, progress=False)
    assert 5 <= len(m["shards"]) <= 8 and m["settings"]["min_shards"] == 6
    assert "shard_tokens lowered from 33,554,432" in undertow_logs.text
    whole = read_docs(out)

    cut = str(tmp_path / "cut")
    longest = max(len(d.tokens) for d in whole)
    m = prepare_shards([corpus], tokenizer_path, cut, shard_tokens=SHARD_TOKENS, max_doc_tokens=longest // 3,
                       progress=False)
    pieces = read_docs(cut)
    assert max(len(p.tokens) for p in pieces) <= longest // 3 and len(pieces) > len(whole)
    by_input = {}
    for p in pieces:
        by_input.setdefault(p.meta["index"], []).append(p.tokens)
    assert [np.concatenate(by_input[d.meta["index"]]).tolist() for d in whole] == [d.tokens.tolist() for d in whole]
    # an input document's pieces never straddle a shard end: a resume skips whole input documents
    assert [s["inputs_consumed"] for s in m["shards"]][-1] == len(whole)
    ends = np.cumsum([s["documents"] for s in m["shards"]])
    assert all(pieces[e - 1].meta["index"] != pieces[e].meta["index"] for e in ends[:-1])
