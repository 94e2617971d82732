"""Which documents a slot reads, in which order, behind a cursor that resumes exactly.

A *slot* is one reader: one DataLoader worker of one rank; there are world_size x max(1, num_workers)
of them and slot `s` is worker `s % workers` of rank `s // workers`. For every epoch and source, the
shards are permuted by (seed, source index, epoch) and dealt to the slots:

- the first `S * (n // S)` shards of the permutation go whole, round-robin: slot s reads shards
  s, s + S, s + 2S, ...;
- the `r = n % S` remaining shards are split at document level: remainder shard j is shared by the
  slots s with s % r == j, slot s keeping the documents whose index in the shard is s // r modulo
  the number of sharing slots. With fewer shards than slots (n < S) every shard is shared this way.

So each epoch's documents are a partition over the slots: none read twice, none lost, whatever n and
S are. A document additionally belongs to the validation split when a stable hash of (source name,
key) falls below `val_fraction`; "train" skips those documents and "val" keeps only them. With
`shuffle_documents`, a slot reads its documents of a shard in an order permuted per epoch (the shard
is then held in memory while it is read). Permutations sort by a hash rather than draw from an RNG,
so they are the same on every platform and NumPy version: a run resumes exactly after an upgrade.

The cursor `[epoch, item, doc, offset]` says where the next unread token is: token `offset` of the
`doc`-th document the slot reads from the `item`-th shard of its epoch plan. It is all a stream needs
to restart exactly: plans and orders are recomputed from the seed.

Resharding (a run resumed with another number of slots: other world size or workers): plans depend
on the number of slots, so the old slots' streams cannot be re-dealt mid-epoch. Instead each old
slot's stream is *inherited* by one new slot and read to the end of epoch E, the first epoch no old
stream had started; the new slots' own streams (new plans) begin at epoch E. Every document of
every epoch is still read exactly once: before E by the old plans (partly before the reshard,
the rest after it), from E on by the new ones. `ChainedStream` is a new slot's stream of one source:
its inherited streams in turn, then its own.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from undertow.pretrain.loader.sources import ShardSet

FRESH_CURSOR = (0, 0, 0, 0)


def unit_hash(*parts: object) -> float:
    """A deterministic, platform-independent hash of `parts` as a float uniform in [0, 1)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def stable_permutation(n: int, *key: object) -> list[int]:
    """A permutation of range(n) decided by `key` alone (the same everywhere, see the module docstring)."""
    return sorted(range(n), key=lambda i: unit_hash(*key, i))


@dataclass(frozen=True)
class StreamSettings:
    """What decides the documents of a slot and their order (shared by all slots of a loader)."""

    num_slots: int
    seed: int
    split: str  # "train" or "val"
    val_fraction: float
    shuffle_documents: bool
    loop: bool  # False: one pass over the split (always the case for "val")


@dataclass(frozen=True)
class PlanItem:
    """One shard of a slot's epoch plan: the slot keeps the documents with index % group == member."""

    shard: int
    group: int
    member: int


def slot_plan(num_shards: int, num_slots: int, slot: int, seed: int, source_index: int, epoch: int) -> list[PlanItem]:
    """The shards slot `slot` reads in `epoch`, in order (see the module docstring)."""
    order = stable_permutation(num_shards, "shards", seed, source_index, epoch)
    whole = (num_shards // num_slots) * num_slots
    plan = [PlanItem(order[i], 1, 0) for i in range(slot, whole, num_slots)]
    remainder = num_shards - whole
    if remainder:
        j = slot % remainder
        plan.append(PlanItem(order[whole + j], len(range(j, num_slots, remainder)), slot // remainder))
    return plan


def in_val_split(source_name: str, key: str, val_fraction: float) -> bool:
    """Whether a document is held out for validation (stable across runs, ranks and workers)."""
    return val_fraction > 0 and unit_hash("val", source_name, key) < val_fraction


class DocumentStream:
    """The documents of one source for one slot, read token by token through a resumable cursor.

    Use `remaining()` for the unread tokens of the current document, `consume(n)` to mark `n` of them
    read, `peek()` for the next token of the current document (None when it is used up) and
    `cursor()` to save the position.
    """

    def __init__(self, shards: ShardSet, source_index: int, slot: int, settings: StreamSettings, cursor=FRESH_CURSOR,
                 until: int | None = None):
        self.shards, self.source_index, self.slot, self.settings = shards, source_index, slot, settings
        self.epoch, self.item, self.doc, self.offset = (int(c) for c in cursor)
        # the epoch at which the stream ends: an inherited stream's `until`; 1 for a one-pass stream
        self.end_epoch = until if until is not None else (None if settings.loop else 1)
        self._plan: list[PlanItem] = []
        self._plan_epoch = -1
        self._docs: Iterator[np.ndarray] | None = None  # the current shard's documents, from self.doc on
        self._tokens: np.ndarray | None = None  # the current document, while partly unread
        self._whole_epoch = (self.item, self.doc, self.offset) == (0, 0, 0)  # read from its start?
        self._docs_this_epoch = 0

    @property
    def done(self) -> bool:
        """True once a one-pass (or inherited) stream has read everything."""
        return self.end_epoch is not None and self.epoch >= self.end_epoch

    def cursor(self) -> list[int]:
        return [self.epoch, self.item, self.doc, self.offset]

    def remaining(self) -> np.ndarray | None:
        """Unread tokens of the current document, (n,) with n >= 1, loading the next document if
        needed; None when a one-pass stream is done."""
        while self._tokens is None:
            if self.done:
                return None
            plan = self._plan_for_epoch()
            if self.item >= len(plan):
                self._next_epoch()
                continue
            if self._docs is None:
                self._docs = self._read_item(plan[self.item])
            tokens = next(self._docs, None)
            if tokens is None:
                self.close()
                self.item, self.doc, self.offset = self.item + 1, 0, 0
            elif len(tokens) == 0:
                self.doc += 1  # an empty document has nothing to read
            elif self.offset >= len(tokens):
                raise ValueError(
                    f"source {self.shards.source!r}: the loader state points at token {self.offset} of a "
                    f"{len(tokens)}-token document (slot {self.slot}, cursor {self.cursor()}): the data changed"
                )
            else:
                self._tokens = tokens
                self._docs_this_epoch += 1
        return self._tokens[self.offset :]

    def consume(self, n: int) -> None:
        """Mark the next `n` tokens of the current document read (n <= len(remaining()))."""
        self.offset += n
        if self.offset == len(self._tokens):
            self._tokens = None
            self.doc, self.offset = self.doc + 1, 0

    def peek(self) -> int | None:
        """The next token of the current document, or None if the current document is used up."""
        return None if self._tokens is None else int(self._tokens[self.offset])

    def close(self) -> None:
        """Release the open shard (a file or a pipe command), if any."""
        if self._docs is not None:
            self._docs.close()
            self._docs = None

    def _plan_for_epoch(self) -> list[PlanItem]:
        if self._plan_epoch != self.epoch:
            s = self.settings
            self._plan = slot_plan(len(self.shards), s.num_slots, self.slot, s.seed, self.source_index, self.epoch)
            self._plan_epoch = self.epoch
        return self._plan

    def _next_epoch(self) -> None:
        if self.settings.loop and self._whole_epoch and self._docs_this_epoch == 0:
            raise ValueError(
                f"source {self.shards.source!r} gives slot {self.slot} no {self.settings.split} document in "
                f"epoch {self.epoch} ({len(self.shards)} shard(s) over {self.settings.num_slots} slots = "
                "world_size x num_workers): use more (or smaller) shards, fewer workers or a smaller val_fraction"
            )
        self.epoch, self.item, self.doc, self.offset = self.epoch + 1, 0, 0, 0
        self._whole_epoch, self._docs_this_epoch = True, 0

    def _read_item(self, item: PlanItem) -> Iterator[np.ndarray]:
        s = self.settings
        order_key = ("documents", s.seed, self.source_index, self.epoch, item.shard) if s.shuffle_documents else None
        return _owned_documents(self.shards, item, s.split, s.val_fraction, order_key, skip=self.doc)


class ChainedStream:
    """One source's stream of a slot that inherited old slots' streams at a reshard (see the module
    docstring): the inherited streams in turn, each to its end epoch, then the slot's own. Offers
    DocumentStream's reading interface; `inherited` and `own` hold the parts (for their cursors)."""

    def __init__(self, inherited: list[DocumentStream], own: DocumentStream):
        self.inherited, self.own = inherited, own
        self._current: DocumentStream = own

    @property
    def done(self) -> bool:
        return self.own.done and all(s.done for s in self.inherited)

    def remaining(self) -> np.ndarray | None:
        for stream in (*self.inherited, self.own):
            if (unread := stream.remaining()) is not None:
                self._current = stream
                return unread
        return None

    @property
    def current(self) -> DocumentStream:
        """The part that gave the last `remaining()`."""
        return self._current

    def consume(self, n: int) -> None:
        self._current.consume(n)

    def peek(self) -> int | None:
        return self._current.peek()

    def close(self) -> None:
        for stream in (*self.inherited, self.own):
            stream.close()


def _owned_documents(
    shards: ShardSet, item: PlanItem, split: str, val_fraction: float, order_key: tuple | None, skip: int
) -> Iterator[np.ndarray]:
    """Tokens of the documents a slot keeps from one shard, in reading order, after the first `skip`."""
    raw = shards.documents(item.shard)
    try:
        kept = (
            tokens
            for index, (key, tokens) in enumerate(raw)
            if index % item.group == item.member and in_val_split(shards.name, key, val_fraction) == (split == "val")
        )
        if order_key is not None:
            docs = list(kept)
            kept = (docs[i] for i in stable_permutation(len(docs), *order_key))
        yield from itertools.islice(kept, skip, None)
    finally:
        raw.close()
