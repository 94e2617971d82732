"""Small tools around the loader: write a tiny shard set, and read documents back out of batches.

Used by the loader tests and handy for any test or debugging session that needs token data without
running `undertow prep`, or wants to see which documents a run's batches contained.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, Iterable

import numpy as np

from undertow.data_prep.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Document,
    sha256_file,
    write_json_atomic,
    write_shard,
)
from undertow.pretrain.loader.packing import IGNORE_INDEX


def random_documents(
    count: int, *, seed: int = 0, min_len: int = 1, max_len: int = 40, low: int = 1, high: int = 1000
) -> list[np.ndarray]:
    """`count` documents of random ids in [low, high) with lengths in [min_len, max_len], each (n,) uint16."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(low, high, size=int(rng.integers(min_len, max_len + 1))).astype(np.uint16) for _ in range(count)
    ]


def write_shard_dir(
    directory: str,
    documents: list[np.ndarray],
    shard_sizes: list[int],
    *,
    tokenizer: dict | None = None,
    key_prefix: str = "doc",
) -> list[str]:
    """Write `documents` as shards of `shard_sizes` documents each (sum must match) plus a manifest.

    Keys are `{key_prefix}{global index:06d}`. Returns the shard paths in order.
    """
    if sum(shard_sizes) != len(documents):
        raise ValueError(f"shard_sizes {shard_sizes} hold {sum(shard_sizes)} documents, got {len(documents)}")
    os.makedirs(directory, exist_ok=True)
    paths, entries, start = [], [], 0
    for i, size in enumerate(shard_sizes):
        path = os.path.join(directory, f"shard-{i:06d}.tar")
        docs = [
            Document(f"{key_prefix}{j:06d}", documents[j], {"source": "test", "index": j, "tokens": len(documents[j])})
            for j in range(start, start + size)
        ]
        with open(path, "wb") as f:
            n_docs, n_tokens = write_shard(f, docs)
        start += size
        paths.append(path)
        entries.append({"file": os.path.basename(path), "documents": n_docs, "tokens": n_tokens,
                        "inputs_consumed": start, "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dtype": "uint16",
        "tokenizer": tokenizer,
        "settings": {},
        "shards": entries,
        "documents": len(documents),
        "tokens": sum(e["tokens"] for e in entries),
        "skipped": {},
        "complete": True,
    }
    if tokenizer is None:
        del manifest["tokenizer"]
    write_json_atomic(os.path.join(directory, MANIFEST_NAME), manifest)
    return paths


def documents_from_batches(
    batches: Iterable[dict], pad_id: int = 0, source_of: Callable[[int], Hashable] | None = None
) -> list[np.ndarray]:
    """Rebuild the documents of ONE slot's consecutive batches (e.g. `PackedLoader.iter_slot`).

    Segments come from `doc_ids`; a segment that ends a row continues in the next segment of the same
    source when that row's last label is not -100 (and that label must be the continuing segment's
    first token, which this checks). With several blended sources, `source_of(token)` must tell which
    source a token comes from (a one-pass row may hold the tail of one source, then another). A
    segment of only `pad_id` tokens with labels -100 is padding and is dropped, so test documents
    should not consist of `pad_id` alone. Returns the documents as (n,) int64 arrays.
    """
    source_of = source_of or (lambda token: 0)
    documents: list[np.ndarray] = []
    carried: dict[Hashable, tuple[list[np.ndarray], int]] = {}  # source -> (pieces of a cut document, its next token)
    for batch in batches:
        ids, labels, doc_ids = (batch[k].numpy() for k in ("input_ids", "labels", "doc_ids"))
        for row_ids, row_labels, row_docs in zip(ids, labels, doc_ids):
            bounds = [0, *(np.flatnonzero(np.diff(row_docs)) + 1), len(row_ids)]
            groups = []
            for s, e in zip(bounds[:-1], bounds[1:]):
                piece = row_ids[s:e]
                if source_of(int(piece[0])) in carried:  # the source's next tokens continue its cut document
                    pieces, next_token = carried.pop(source_of(int(piece[0])))
                    if piece[0] != next_token:
                        raise ValueError(
                            f"a row starts with {piece[0]}, but the document it continues goes on with {next_token}"
                        )
                    groups.append(pieces + [piece])
                elif not ((piece == pad_id).all() and (row_labels[s:e] == IGNORE_INDEX).all()):
                    groups.append([piece])
            if row_labels[-1] != IGNORE_INDEX:
                carried[source_of(int(row_ids[-1]))] = (groups.pop(), int(row_labels[-1]))
            documents.extend(np.concatenate(g).astype(np.int64) for g in groups)
    documents.extend(np.concatenate(pieces).astype(np.int64) for pieces, _ in carried.values())
    return documents


def document_multiset(documents: Iterable[np.ndarray]) -> list[tuple[int, ...]]:
    """Documents as a sorted list of tuples, to compare collections of documents regardless of order."""
    return sorted(tuple(int(t) for t in doc) for doc in documents)
