"""Reading raw inputs: formats, splits, order, and every bad-input case (error or counted skip)."""

import gzip
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from undertow.data_prep import sources as S
from undertow.data_prep.sources import RawDocument, Skip, SkipCounter, Sources

from .conftest import write_jsonl


def _read(paths, **kw):
    items = list(Sources(paths, **kw).items())
    docs = [(os.path.basename(d.source), d.index, d.text) for d in items if isinstance(d, RawDocument)]
    skips = [(s.reason, s.where) for s in items if isinstance(s, Skip)]
    return docs, skips


def test_text_splits_and_gzip(tmp_path):
    body = "first para\nline two\n\n   \n\nsecond para\n\n"
    (tmp_path / "a.txt").write_text(body)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("zipped")
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")]
    assert _read(paths)[0] == [("a.txt", 0, body), ("b.txt.gz", 0, "zipped")]
    assert _read(paths, text_split="paragraph")[0] == [
        ("a.txt", 0, "first para\nline two"), ("a.txt", 1, "second para"), ("b.txt.gz", 0, "zipped")]
    docs, skips = _read(paths[:1], text_split="line")
    assert docs == [("a.txt", 0, "first para"), ("a.txt", 1, "line two"), ("a.txt", 5, "second para")]
    assert [r for r, _ in skips] == [S.EMPTY] * 4  # blank lines are empty documents in line mode


def test_globs_expand_sorted_and_jsonl_gz(tmp_path):
    for name in ("c", "a", "b"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": name}])
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write('{"text": "d"}\n')
    docs, _ = _read([str(tmp_path / "*.jsonl"), str(tmp_path / "*.gz")])
    assert [d[2] for d in docs] == ["a", "b", "c", "d"]


def test_jsonl_bad_lines_are_counted_skips(tmp_path, undertow_logs):
    path = tmp_path / "bad.jsonl"
    lines = [b'{"text": "good one"}', b"{not json", b'["a list"]', b'{"other": "x"}', b'{"text": 5}',
             b'{"text": "  \\n "}', b'{"text": "bad \xff byte"}', b"", b'{"body": "custom field"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs, skips = _read([str(path)])
    assert docs == [("bad.jsonl", 0, "good one")]
    assert skips == [(S.NOT_JSON, f"{path}:2"), (S.NOT_OBJECT, f"{path}:3"), (S.MISSING_FIELD, f"{path}:4"),
                     (S.NOT_STRING, f"{path}:5"), (S.EMPTY, f"{path}:6"), (S.INVALID_UTF8, f"{path}:7"),
                     (S.NOT_JSON, f"{path}:8"), (S.MISSING_FIELD, f"{path}:9")]
    assert _read([str(path)], field="body")[0] == [("bad.jsonl", 8, "custom field")]

    counter = SkipCounter(examples=1)
    assert [d.text for d in Sources([str(path)]).documents(counter)] == ["good one"]
    assert counter.counts[S.NOT_JSON] == 2 and counter.counts[S.MISSING_FIELD] == 2 and counter.total == 8
    assert f"{path}:2" in undertow_logs.text and f"{path}:8" not in undertow_logs.text  # one logged example per reason
    assert "jsonl line is not json: 2" in counter.summary()


def test_text_invalid_utf8_and_empty_files(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b" \n\t\n")
    (tmp_path / "lines.txt").write_bytes(b"ok\nbad \xff\nok again\n")
    docs, skips = _read([str(tmp_path / n) for n in ("bad.txt", "empty.txt", "blank.txt")])
    assert docs == [] and [r for r, _ in skips] == [S.INVALID_UTF8, S.EMPTY, S.EMPTY]
    docs, skips = _read([str(tmp_path / "lines.txt")], text_split="line")
    assert [d[2] for d in docs] == ["ok", "ok again"] and skips == [(S.INVALID_UTF8, f"{tmp_path}/lines.txt:2")]


def test_parquet_row_groups_nulls_and_bad_columns(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"text": ["a", None, " ", "d", "e"], "n": [1, 2, 3, 4, 5]}), path, row_group_size=2)
    docs, skips = _read([path])
    assert docs == [("t.parquet", 0, "a"), ("t.parquet", 3, "d"), ("t.parquet", 4, "e")]
    assert skips == [(S.MISSING_FIELD, f"{path}:row 1"), (S.EMPTY, f"{path}:row 2")]
    with pytest.raises(ValueError, match="has no column 'body'"):
        Sources([path], field="body")
    with pytest.raises(ValueError, match="column 'n' .* expected string"):
        Sources([path], field="n")


@pytest.mark.parametrize("inputs, kwargs, error, message", [
    (["{d}/nothing-*.jsonl"], {}, FileNotFoundError, "matches no file"),
    (["{d}/missing.jsonl"], {}, FileNotFoundError, "does not exist"),
    (["{d}"], {}, ValueError, "is a directory"),
    (["{d}/a.jsonl", "{d}/*.jsonl"], {}, ValueError, "named twice"),
    (["{d}/a.csv"], {}, ValueError, "cannot tell the format"),
    (["{d}/a.jsonl"], {"fmt": "csv"}, ValueError, "format 'csv' is not one of"),
    (["{d}/a.jsonl"], {"text_split": "word"}, ValueError, "text_split 'word' is not one of"),
    ([], {}, ValueError, "inputs is empty"),
])
def test_input_errors_come_before_any_work(tmp_path, inputs, kwargs, error, message):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(error, match=message):
        Sources([p.format(d=tmp_path) for p in inputs], **kwargs)
