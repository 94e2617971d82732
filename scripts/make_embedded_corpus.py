"""Build the embedded default corpus from Python's own reference-manual topics.

    python scripts/make_embedded_corpus.py [--out undertow/data_prep/corpus/pydoc_topics.jsonl.gz]

`pydoc_data.topics.topics` maps a topic name (e.g. "assert", "for") to a section of the
Python Language Reference as plain text (PSF license). Each topic is cut into documents
of roughly 1-3 KB at paragraph boundaries (a paragraph longer than the upper bound is cut
at line boundaries), written as JSONL {"text": ..., "topic": ...} in sorted topic order
and gzipped with mtime 0, so the same Python version gives a byte-identical file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

from pydoc_data.topics import topics

MIN_CHARS = 1024  # a document grows until at least this long ...
MAX_CHARS = 3072  # ... and is closed before it would pass this
DEFAULT_OUT = os.path.join(
    os.path.dirname(__file__), "..", "undertow", "data_prep", "corpus", "pydoc_topics.jsonl.gz"
)


def _pieces(text: str) -> list[str]:
    """Paragraphs of `text`; a paragraph over MAX_CHARS is cut into runs of whole lines."""
    out = []
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        if len(para) <= MAX_CHARS:
            out.append(para)
            continue
        run: list[str] = []
        for line in para.split("\n"):
            if run and len("\n".join(run + [line])) > MAX_CHARS:
                out.append("\n".join(run))
                run = []
            run.append(line)
        out.append("\n".join(run))
    return out


def split_topic(text: str) -> list[str]:
    """Cut one topic into documents of about MIN_CHARS..MAX_CHARS characters."""
    docs, current = [], ""
    for piece in _pieces(text):
        joined = f"{current}\n\n{piece}" if current else piece
        if current and len(current) >= MIN_CHARS and len(joined) > MAX_CHARS:
            docs.append(current)
            joined = piece
        current = joined
    if current:
        docs.append(current)
    return docs


def build(out_path: str) -> tuple[int, int]:
    """Write the corpus; returns (documents, bytes written)."""
    lines = []
    for topic in sorted(topics):
        for text in split_topic(topics[topic]):
            lines.append(json.dumps({"text": text, "topic": topic}, ensure_ascii=False, sort_keys=True))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    tmp = f"{out_path}.tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(payload)
    os.replace(tmp, out_path)
    return len(lines), os.path.getsize(out_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output .jsonl.gz path (default: the packaged corpus)")
    args = parser.parse_args()
    n_docs, n_bytes = build(os.path.normpath(args.out))
    print(f"wrote {n_docs} documents, {n_bytes} bytes to {os.path.normpath(args.out)} "
          f"(Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
