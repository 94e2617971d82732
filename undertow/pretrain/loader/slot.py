"""One slot's batches: choose a source per row, pack rows, and keep a state that resumes exactly.

Blending: each row comes from one source, drawn with probability proportional to its weight by a
hash of (seed, slot, row counter, attempt), so no RNG state is saved: the row counter is enough.
Sources of weight 0 are never read. In a looping run streams never end, so `attempt` is always 0.
In a one-pass run a row whose source runs out is continued from another source still holding
documents (drawn again among those, `attempt` counting the draws) so padding only appears once every
source is used up.

Interleaving (looping runs): each source's stream is read through `data.interleave` lanes, row r
from lane r % K (interleave.py), so the rows of a batch come from different documents.

Slot state (JSON): {"slot": int, "rows": int, "cursors": [[epoch, item, doc, offset] per source]},
with interleaving "lanes": [[open document record or null per lane] per source] and, after a reshard
until they are read, "pending": [[records] per source] (interleave.py); after a reshard until the
inherited streams are read, "inherited": [{"slot": old slot, "num_slots": its number of slots,
"until": [end epoch per source], "cursors": [... per source]}] (see streams.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from undertow.pretrain.loader.interleave import InterleavedStream, reopener
from undertow.pretrain.loader.packing import Row, pack_rows
from undertow.pretrain.loader.sources import ShardSet
from undertow.pretrain.loader.streams import (
    FRESH_CURSOR,
    ChainedStream,
    DocumentStream,
    StreamSettings,
    unit_hash,
)

# Private keys a worker adds to each batch; the main process strips them.
SLOT_KEY, STATE_KEY, EXHAUSTED_KEY = "_slot", "_state", "_exhausted"


@dataclass(frozen=True)
class LoaderSpec(StreamSettings):
    """Everything that decides a loader's batches, resolved and validated (picklable)."""

    sources: tuple[ShardSet, ...]
    weights: tuple[float, ...]
    seq_len: int
    batch_size: int
    pad_id: int
    interleave: int = 1  # lanes per source of a looping slot (interleave.py)


def fresh_slot_state(slot: int, num_sources: int) -> dict:
    return {"slot": slot, "rows": 0, "cursors": [list(FRESH_CURSOR) for _ in range(num_sources)]}


class SlotProducer:
    """Produces the batches of slot `slot` from `state` on (a fresh start when None)."""

    def __init__(self, spec: LoaderSpec, slot: int, state: dict | None = None):
        state = state if state is not None else fresh_slot_state(slot, len(spec.sources))
        self.spec, self.slot, self.rows = spec, slot, int(state["rows"])
        self.inherited = [dict(e) for e in state.get("inherited", [])]
        n = len(spec.sources)
        lanes, pending = state.get("lanes") or [[]] * n, state.get("pending") or [[]] * n
        self.streams = [self._stream(i, shards, cursor, lanes[i], pending[i])
                        for i, (shards, cursor) in enumerate(zip(spec.sources, state["cursors"]))]
        self._blended = [i for i, w in enumerate(spec.weights) if w > 0]

    def _stream(self, i: int, shards: ShardSet, cursor, lanes: list, pending: list):
        sequence = own = DocumentStream(shards, i, self.slot, self.spec, cursor)
        if self.inherited:
            old = [DocumentStream(shards, i, e["slot"], replace(self.spec, num_slots=e["num_slots"]),
                                  e["cursors"][i], until=e["until"][i]) for e in self.inherited]
            sequence = ChainedStream(old, own)
        if not self.spec.loop:
            return sequence
        return InterleavedStream(sequence, self.spec.interleave, reopener(shards, i, self.spec), lanes, pending)

    def state(self) -> dict:
        sequences = [s.sequence if isinstance(s, InterleavedStream) else s for s in self.streams]
        state = {"slot": self.slot, "rows": self.rows, "cursors": [self._own(s).cursor() for s in sequences]}
        if self.spec.loop:
            state["lanes"] = [s.lane_records() for s in self.streams]
            if any(s.pending_records() for s in self.streams):
                state["pending"] = [s.pending_records() for s in self.streams]
        inherited = []
        for k, entry in enumerate(self.inherited):
            streams = [s.inherited[k] for s in sequences]
            if not all(s.done for s in streams):  # read entries drop out of the state
                inherited.append({**entry, "cursors": [s.cursor() for s in streams]})
        if inherited:
            state["inherited"] = inherited
        return state

    @staticmethod
    def _own(stream: DocumentStream | ChainedStream) -> DocumentStream:
        return stream.own if isinstance(stream, ChainedStream) else stream

    def next_batch(self) -> dict | None:
        """The next batch, or None once a one-pass run is over (the last batch is padded)."""
        rows: list[Row] = []
        while len(rows) < self.spec.batch_size:
            row = self._fill_row()
            if not row.pieces:
                break
            rows.append(row)
        return pack_rows(rows, self.spec.seq_len, self.spec.batch_size, self.spec.pad_id) if rows else None

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def _fill_row(self) -> Row:
        row, need, attempt, last = Row(), self.spec.seq_len, 0, None
        while need:
            active = [i for i in self._blended if not self.streams[i].done]
            if not active:
                break
            last = self.streams[self._choose(active, attempt)]
            if isinstance(last, InterleavedStream):
                last.select(self.rows)
            attempt += 1
            while need and (unread := last.remaining()) is not None:
                piece = unread[:need]
                row.pieces.append(piece)
                last.consume(len(piece))
                need -= len(piece)
        if not need and last is not None:
            row.next_token = last.peek()
        self.rows += 1
        return row

    def _choose(self, active: list[int], attempt: int) -> int:
        weights = self.spec.weights
        target = unit_hash("blend", self.spec.seed, self.slot, self.rows, attempt) * sum(weights[i] for i in active)
        for i in active:
            target -= weights[i]
            if target < 0:
                return i
        return active[-1]  # float rounding at the top end


def reshard_slots(old_slots: list[dict], spec: LoaderSpec, num_slots: int, rank: int, workers: int) -> list[dict]:
    """The slot states of `rank` (its `workers` slots of `num_slots`) continuing `old_slots` (every
    slot state of a run with another number of slots, in slot order): old slot k's streams and
    those it had inherited itself go to new slot k % num_slots, bounded per source by the first
    epoch none of them had started, where every new slot's own streams begin."""
    entries, heir = [], []  # heir[k]: the index in `entries` of old slot k's own stream
    for old in old_slots:
        heir.append(len(entries))
        entries.append({"slot": old["slot"], "num_slots": len(old_slots), "until": None, "cursors": old["cursors"]})
        entries.extend(old.get("inherited", []))
    num_sources = len(spec.sources)
    start = []  # per source: the first epoch no old stream has started (each one-pass stream ends at 1)
    for i in range(num_sources):
        epochs = [c[0] + (0 if tuple(c[1:]) == (0, 0, 0) else 1) for c in (e["cursors"][i] for e in entries)]
        start.append(max(epochs) if spec.loop else 1)
    for entry in entries:
        if entry["until"] is None:
            entry["until"] = list(start)
    states = []
    for slot in range(rank * workers, (rank + 1) * workers):
        state = {"slot": slot, "rows": 0, "cursors": [[start[i], 0, 0, 0] for i in range(num_sources)]}
        mine = [e for k, e in enumerate(entries) if k % num_slots == slot]
        if mine:
            state["inherited"] = mine
        # the documents the old slots had open (interleave.py) are finished first by the slot that
        # inherits their streams
        pending = [[r for k, old in enumerate(old_slots) if heir[k] % num_slots == slot
                    for r in [*(old.get("lanes") or [[]] * num_sources)[i], *(old.get("pending") or [[]] * num_sources)[i]]
                    if r is not None] for i in range(num_sources)]
        if any(pending):
            state["pending"] = pending
        states.append(state)
    return states


def iterate_slot(spec: LoaderSpec, slot: int, state: dict | None = None) -> Iterator[tuple[dict | None, dict]]:
    """Yield (batch, state after it) for one slot; batch None marks the end of a one-pass run (then
    stops)."""
    producer = SlotProducer(spec, slot, state)
    try:
        while True:
            batch = producer.next_batch()
            yield batch, producer.state()
            if batch is None:
                return
    finally:
        producer.close()


class RankWorkers(IterableDataset):
    """The slots of one rank as a DataLoader dataset: worker w plays logical slot (w + rotation) % N.

    Each yielded batch carries its slot and that slot's state after it (private keys). A slot whose
    one-pass run is over yields state-only `EXHAUSTED_KEY` markers forever instead of stopping, so the
    DataLoader's round-robin over workers never changes and the order of batches stays exact.
    """

    def __init__(self, spec: LoaderSpec, first_slot: int, states: list[dict], rotation: int):
        self.spec, self.first_slot, self.states, self.rotation = spec, first_slot, states, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None or info.num_workers != len(self.states):
            raise RuntimeError(f"RankWorkers must run in a DataLoader with num_workers={len(self.states)}")
        logical = (info.id + self.rotation) % info.num_workers
        for batch, state in iterate_slot(self.spec, self.first_slot + logical, self.states[logical]):
            if batch is not None:
                yield {**batch, SLOT_KEY: logical, STATE_KEY: state}
        while True:
            yield {SLOT_KEY: logical, STATE_KEY: state, EXHAUSTED_KEY: 1}
