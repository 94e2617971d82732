"""Raw documents from text, JSONL and Parquet files, in a fixed order, with counted skips.

`Sources(inputs, fmt=..., field=..., text_split=...)` checks every input before any work
(globs expanded in sorted order, missing files, unknown formats, Parquet columns) and
then streams, file by file:

    RawDocument(source, index, text)   one document; `index` is its record position in
                                       the file (0 for a whole file, the 0-based line for
                                       JSONL and line split, the paragraph for paragraph
                                       split, the row for Parquet), counting skipped records
    Skip(reason, where, detail)        one bad record, in stream order (`where` = file:line)

Skips travel in the stream rather than being counted on the side so that whoever consumes
the stream (possibly behind worker processes) counts them in document order; a
`SkipCounter` turns them into `reason -> count` and logs the first few of each reason.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from typing import IO, Iterator, Sequence

from undertow.log import get_logger

log = get_logger("undertow.data_prep.sources")

FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_SPLITS = ("file", "paragraph", "line")
_SUFFIX_FORMATS = {  # checked in order against the lower-cased file name
    ".jsonl.gz": "jsonl", ".jsonl": "jsonl", ".ndjson": "jsonl", ".ndjson.gz": "jsonl",
    ".txt.gz": "text", ".txt": "text", ".text": "text", ".md": "text",
    ".parquet": "parquet", ".pq": "parquet",
}

# Skip reasons (the keys of a manifest's "skipped").
INVALID_UTF8 = "invalid utf-8"
EMPTY = "empty or whitespace-only"
NOT_JSON = "jsonl line is not json"
NOT_OBJECT = "jsonl line is not an object"
MISSING_FIELD = "missing text field"
NOT_STRING = "text field is not a string"
EMPTY_AFTER_TOKENIZATION = "empty after tokenization"


@dataclass(frozen=True)
class RawDocument:
    """One input document before tokenization."""

    source: str  # the file path as expanded from the inputs
    index: int  # record position within `source`
    text: str


@dataclass(frozen=True)
class Skip:
    """One input record that was not used, and why."""

    reason: str
    where: str  # "path:line" / "path:row N" / "path"
    detail: str = ""


class SkipCounter:
    """Counts skipped records by reason and logs the first `examples` of each reason."""

    def __init__(self, examples: int = 3, counts: dict[str, int] | None = None):
        self.examples = examples
        self.counts: dict[str, int] = dict(counts or {})

    def add(self, skip: Skip) -> None:
        n = self.counts.get(skip.reason, 0) + 1
        self.counts[skip.reason] = n
        if n <= self.examples:
            detail = f" ({skip.detail})" if skip.detail else ""
            more = f"; further {skip.reason!r} skips are only counted" if n == self.examples else ""
            log.warning("skipped %s: %s%s%s", skip.where, skip.reason, detail, more)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self) -> str:
        return format_skips(self.counts)


def format_skips(counts: dict[str, int]) -> str:
    """'reason: n, reason: n' in sorted order, or 'none'."""
    return ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())) or "none"


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Expand paths and glob patterns (each sorted) into a list of files, checking them all.

    Raises FileNotFoundError for a missing file or a pattern that matches nothing, and
    ValueError for a directory or a file named twice, before anything is read.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("inputs is empty: give at least one file path or glob pattern")
    files: list[str] = []
    first_seen: dict[str, str] = {}
    for pattern in inputs:
        if any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"input pattern {pattern!r} matches no file")
        elif os.path.isdir(pattern):
            raise ValueError(f"input {pattern!r} is a directory: pass files or a glob such as '{pattern}/*.jsonl'")
        elif not os.path.isfile(pattern):
            raise FileNotFoundError(f"input file {pattern!r} does not exist")
        else:
            matches = [pattern]
        for path in matches:
            real = os.path.realpath(path)
            if real in first_seen:
                raise ValueError(f"input file {path!r} is named twice (by {first_seen[real]!r} and {pattern!r}); "
                                 "its documents would be used twice")
            first_seen[real] = pattern
            files.append(path)
    return files


def detect_format(path: str, fmt: str = "auto") -> str:
    """The reader for `path`: `fmt` itself, or for "auto" the one its suffix names."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    if fmt != "auto":
        if fmt == "parquet" and path.lower().endswith(".gz"):
            raise ValueError(f"{path!r}: gzip is supported for text and jsonl, not parquet")
        return fmt
    name = path.lower()
    for suffix, found in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return found
    raise ValueError(f"cannot tell the format of {path!r} from its suffix (known: {', '.join(_SUFFIX_FORMATS)}); "
                     f"pass format= one of {FORMATS[1:]}")


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _decode(payload: bytes, where: str) -> str | Skip:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        return Skip(INVALID_UTF8, where, f"byte {e.start}")


def _document(source: str, index: int, text: str | Skip, where: str) -> RawDocument | Skip:
    if isinstance(text, Skip):
        return text
    if not text.strip():
        return Skip(EMPTY, where)
    return RawDocument(source, index, text)


def _read_text(path: str, split: str) -> Iterator[RawDocument | Skip]:
    with _open_binary(path) as f:
        if split == "file":
            yield _document(path, 0, _decode(f.read(), path), path)
        elif split == "line":
            for i, line in enumerate(f):
                where = f"{path}:{i + 1}"
                yield _document(path, i, _decode(line.rstrip(b"\r\n"), where), where)
        else:
            yield from _read_paragraphs(path, f)


def _read_paragraphs(path: str, f: IO[bytes]) -> Iterator[RawDocument | Skip]:
    """Paragraphs are runs of lines separated by blank (whitespace-only) lines."""
    para: list[bytes] = []
    first_line = index = 0
    for lineno, line in enumerate(f, start=1):
        line = line.rstrip(b"\r\n")
        if line.strip():
            if not para:
                first_line = lineno
            para.append(line)
        elif para:
            where = f"{path}:{first_line}"
            yield _document(path, index, _decode(b"\n".join(para), where), where)
            para, index = [], index + 1
    if para:
        where = f"{path}:{first_line}"
        yield _document(path, index, _decode(b"\n".join(para), where), where)


def _read_jsonl(path: str, field: str) -> Iterator[RawDocument | Skip]:
    with _open_binary(path) as f:
        for i, line in enumerate(f):
            where = f"{path}:{i + 1}"
            text = _decode(line, where)
            if isinstance(text, Skip):
                yield text
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield Skip(NOT_JSON, where, e.msg)
                continue
            if not isinstance(obj, dict):
                yield Skip(NOT_OBJECT, where, type(obj).__name__)
            elif field not in obj:
                yield Skip(MISSING_FIELD, where, f"no {field!r}")
            elif not isinstance(obj[field], str):
                yield Skip(NOT_STRING, where, f"{field!r} is {type(obj[field]).__name__}")
            else:
                yield _document(path, i, obj[field], where)


def _check_parquet(path: str, field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if field not in schema.names:
        raise ValueError(f"parquet file {path!r} has no column {field!r} (columns: {schema.names}); pass field=")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise ValueError(f"parquet column {field!r} of {path!r} has type {kind}; expected string or binary")


def _read_parquet(path: str, field: str) -> Iterator[RawDocument | Skip]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = 0
    for group in range(pf.num_row_groups):
        for value in pf.read_row_group(group, columns=[field]).column(0).to_pylist():
            where = f"{path}:row {row}"
            if value is None:
                yield Skip(MISSING_FIELD, where, "null")
            else:
                yield _document(path, row, _decode(value, where) if isinstance(value, bytes) else value, where)
            row += 1


class Sources:
    """A checked, ordered set of input files and how to read them.

    Args:
        inputs: file paths and glob patterns; each pattern expands in sorted order.
        fmt: "auto" (by suffix), "text", "jsonl" or "parquet"; ".gz" works for text and jsonl.
        field: the JSON key / Parquet column that holds the text.
        text_split: for text files, "file" (one document per file), "paragraph" or "line".
    """

    def __init__(self, inputs: Sequence[str], *, fmt: str = "auto", field: str = "text", text_split: str = "file"):
        if text_split not in TEXT_SPLITS:
            raise ValueError(f"text_split {text_split!r} is not one of {TEXT_SPLITS}")
        if not field:
            raise ValueError("field must be a non-empty column/key name")
        self.files = expand_inputs(inputs)
        self.formats = [detect_format(p, fmt) for p in self.files]
        self.field = field
        self.text_split = text_split
        for path, kind in zip(self.files, self.formats):
            if kind == "parquet":
                _check_parquet(path, field)

    def describe(self) -> list[dict]:
        """What the byte-determining settings record about the inputs: path, format, size."""
        return [{"path": p, "format": k, "bytes": os.path.getsize(p)} for p, k in zip(self.files, self.formats)]

    def items(self) -> Iterator[RawDocument | Skip]:
        """Every document and every skip, file by file, in a fixed order."""
        for path, kind in zip(self.files, self.formats):
            if kind == "text":
                yield from _read_text(path, self.text_split)
            elif kind == "jsonl":
                yield from _read_jsonl(path, self.field)
            else:
                yield from _read_parquet(path, self.field)

    def documents(self, skips: SkipCounter) -> Iterator[RawDocument]:
        """Only the documents; skips go to `skips`."""
        for item in self.items():
            if isinstance(item, Skip):
                skips.add(item)
            else:
                yield item
