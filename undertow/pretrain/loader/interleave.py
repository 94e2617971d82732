"""Interleaving: a slot reads K documents of a source at once, so long documents mix with others.

Read one document to its end, a slot fills every row of many consecutive batches from a long
document (a 200k-token file at 4 x 2048 tokens per batch is 25 batches in a row), and those
optimizer steps all see one text. `InterleavedStream` keeps K *lanes* over the slot's document
sequence (the order streams.py decides): row r of the slot is filled from lane r % K, and a lane whose
document ends takes the sequence's next document (whole). The rows of a batch then come from K
different documents whenever K >= the batch size, and a long document gives only every K-th row.
K = 1 is plain streaming. Lanes take documents on demand in row order, so the order of
documents read is as deterministic as the rows.

Exact resume: each open lane is saved as a self-contained record {"slot", "num_slots", "cursor"}
naming the stream that dealt the document (this slot's own plan, or an old slot's plan it inherited
at a reshard) and the position [epoch, item, doc, offset] of its next unread token, so a resumed
stream reopens the document wherever it lies. At a reshard, or when K shrinks, the open lanes of the
old slots become *pending* documents of a new slot, which its lanes take before any new document:
nothing half-read is lost or read twice.

One-pass streams (the val split, loop=False) are not interleaved: their end (padding only once
everything is read) is simplest with one lane, and order does not matter for a validation mean.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from undertow.pretrain.loader.streams import ChainedStream, DocumentStream, StreamSettings

# (slot, num_slots, cursor) -> the document's tokens from the cursor's offset on
Reopen = Callable[[int, int, list], np.ndarray]


def reopener(shards, source_index: int, settings: StreamSettings) -> Reopen:
    """Reopen a document of `shards` (source `source_index`) from a lane record's stream and cursor."""
    def reopen(slot: int, num_slots: int, cursor: list) -> np.ndarray:
        epoch, item, doc, offset = (int(c) for c in cursor)
        stream = DocumentStream(shards, source_index, slot, replace(settings, num_slots=num_slots),
                                (epoch, item, doc, 0))
        try:
            tokens = stream.remaining()
        finally:
            stream.close()
        if tokens is None or offset >= len(tokens):
            raise ValueError(f"source {shards.source!r}: the loader state's open document (slot {slot} of "
                             f"{num_slots}, cursor {cursor}) is not in the data any more: the data changed")
        return tokens[offset:]
    return reopen


class _Lane:
    """One open document: where it came from, its unread tokens and how many of them are read."""

    def __init__(self, slot: int, num_slots: int, cursor: list, tokens: np.ndarray):
        self.slot, self.num_slots = slot, num_slots
        self.epoch, self.item, self.doc, self.base = (int(c) for c in cursor)
        self.tokens, self.read = tokens, 0

    def record(self) -> dict:
        return {"slot": self.slot, "num_slots": self.num_slots,
                "cursor": [self.epoch, self.item, self.doc, self.base + self.read]}


class InterleavedStream:
    """K lanes over `sequence` (a DocumentStream or ChainedStream of a looping slot); offers the
    reading interface of DocumentStream for the lane chosen by `select(row)`.

    lanes:   saved lane records (None for a free lane), any number (beyond K they wait as pending);
    pending: saved lane records of documents to finish before taking new ones."""

    def __init__(self, sequence: DocumentStream | ChainedStream, k: int, reopen: Reopen,
                 lanes: list | None = None, pending: list | None = None):
        self.sequence, self.k, self._reopen = sequence, k, reopen
        records = list(lanes or [])
        self._pending = [r for r in records[k:] if r is not None] + list(pending or [])
        self._lanes: list[_Lane | None] = [self._open(r) if r is not None else None for r in records[:k]]
        self._lanes += [None] * (k - len(self._lanes))
        self._lane = 0

    def _open(self, record: dict) -> _Lane:
        tokens = self._reopen(record["slot"], record["num_slots"], record["cursor"])
        return _Lane(record["slot"], record["num_slots"], record["cursor"], tokens)

    def select(self, row: int) -> None:
        """Read from the lane of the slot's row number `row` from now on."""
        self._lane = row % self.k

    @property
    def done(self) -> bool:
        return False  # looping: the sequence never ends

    def remaining(self) -> np.ndarray:
        lane = self._lanes[self._lane]
        if lane is None:
            lane = self._lanes[self._lane] = self._take()
        return lane.tokens[lane.read:]

    def consume(self, n: int) -> None:
        lane = self._lanes[self._lane]
        lane.read += n
        if lane.read == len(lane.tokens):
            self._lanes[self._lane] = None

    def peek(self) -> int | None:
        lane = self._lanes[self._lane]
        return None if lane is None else int(lane.tokens[lane.read])

    def close(self) -> None:
        self.sequence.close()

    def lane_records(self) -> list:
        return [lane.record() if lane is not None else None for lane in self._lanes]

    def pending_records(self) -> list:
        return list(self._pending)

    def _take(self) -> _Lane:
        """The next document for a free lane: a pending one first, else the sequence's next, whole."""
        if self._pending:
            return self._open(self._pending.pop(0))
        tokens = self.sequence.remaining()
        if tokens is None:
            raise RuntimeError("a looping document stream ended")  # cannot happen: loop streams never end
        source = self.sequence.current if isinstance(self.sequence, ChainedStream) else self.sequence
        lane = _Lane(source.slot, source.settings.num_slots, source.cursor(), tokens)
        self.sequence.consume(len(tokens))
        return lane
