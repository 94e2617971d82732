"""PackedLoader: one rank's packed, blended, resumable batches (see the package docstring)."""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from undertow.log import get_logger
from undertow.pretrain.loader.checks import (
    STATE_FORMAT,
    STATE_VERSION,
    check_reshard_states,
    check_state,
    common_tokenizer,
    validate_arguments,
)
from undertow.pretrain.loader.slot import (
    EXHAUSTED_KEY,
    SLOT_KEY,
    STATE_KEY,
    LoaderSpec,
    RankWorkers,
    fresh_slot_state,
    iterate_slot,
    reshard_slots,
)
from undertow.pretrain.loader.sources import resolve_source

log = get_logger("pretrain.loader")


class PackedLoader:
    """Packed, blended, resumable batches for one rank. See the module docstring and packing.py.

    Args:
        sources: source strings (see sources.py): manifest directories, tar paths/globs/brace
            patterns, `pipe:` or other webdataset URLs, `megatron:PREFIX`.
        seq_len: T, tokens per row (>= 2). batch_size: B, rows per batch.
        weights: per-source blending weights (>= 0, not all 0); None = equal. Weight-0 sources are not read.
        rank, world_size, num_workers: this process's slots are rank * N ... rank * N + N - 1 of
            world_size * N, N = max(1, num_workers).
        seed: decides shard order per epoch, document order and blending.
        split: "train" or "val"; val_fraction: share of documents held out for "val" (by a stable hash
            of source name and document key). "val" needs val_fraction > 0 and is always one pass.
        loop: train loops over epochs forever; False makes train one pass too.
        shuffle_documents: permute the documents of each shard per epoch (holds a shard in memory).
        interleave: K, documents of a source each looping slot reads at once; row r comes from the
            r % K-th (interleave.py), so a batch's rows come from different documents when K >= B and a
            long document is not read into many batches in a row. 1 reads documents one after another.

    Padding (end of a one-pass run only) uses the first manifest tokenizer's pad_id when it is >= 0,
    else 0; padded positions are their own segment with labels -100. `iter_slot(slot)` runs any one
    slot in this process (tests, tools). `num_slots`, `workers_per_rank` describe the split.
    """

    def __init__(
        self,
        sources: list[str],
        *,
        seq_len: int,
        batch_size: int,
        weights: list[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        split: str = "train",
        val_fraction: float = 0.0,
        loop: bool = True,
        shuffle_documents: bool = True,
        interleave: int = 1,
    ):
        validate_arguments(locals())
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers_per_rank = max(1, num_workers)
        self.num_slots = world_size * self.workers_per_rank
        shard_sets = tuple(resolve_source(s, f"sources[{i}]") for i, s in enumerate(sources))
        tokenizer = common_tokenizer(shard_sets)
        pad_id = tokenizer.get("pad_id", -1) if tokenizer else -1
        self._spec = LoaderSpec(
            num_slots=self.num_slots,
            seed=seed,
            split=split,
            val_fraction=float(val_fraction),
            shuffle_documents=bool(shuffle_documents),
            loop=bool(loop) and split == "train",
            sources=shard_sets,
            weights=tuple(float(w) for w in (weights if weights is not None else [1.0] * len(sources))),
            seq_len=seq_len,
            batch_size=batch_size,
            pad_id=pad_id if isinstance(pad_id, int) and pad_id >= 0 else 0,
            interleave=interleave,
        )
        self._tokenizer = shard_sets[0].tokenizer
        self._settings = self._describe_settings()
        self._reset_position()
        self._resume_pending, self._generation = False, 0
        log.info(
            "PackedLoader %s: %d source(s) (%s shards), rank %d of %d with %d slot(s), %d x %d tokens per batch%s",
            split,
            len(sources),
            "+".join(str(len(s)) for s in shard_sets),
            rank,
            world_size,
            self.workers_per_rank,
            batch_size,
            seq_len,
            f", {interleave} documents at once per source" if self._spec.loop and interleave > 1 else
            ("" if self._spec.loop else ", one pass"),
        )

    # ---- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._spec.split == "val" and not self._resume_pending:
            self._reset_position()
        self._resume_pending = False
        self._generation += 1  # older iterators of this loader stop: two cursors would corrupt the state
        return self._batches(self._generation)

    def _batches(self, generation: int) -> Iterator[dict[str, torch.Tensor]]:
        source = self._iterate_in_process(generation) if self.num_workers == 0 else self._iterate_workers(generation)
        yielded = 0
        for batch in source:
            yielded += 1
            yield batch
        if yielded == 0 and self._spec.split == "val":
            log.warning("the val split gave rank %d no batch (val_fraction=%s)", self.rank, self._spec.val_fraction)

    def iter_slot(self, slot: int, state: dict | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one slot (0 <= slot < num_slots; slot = rank * N + worker), in this process,
        from `state` (one entry of `state_dict()["slots"]`) or from the start. Lets tests and tools see
        what every rank and worker would read without starting them. Does not move this loader."""
        if not (isinstance(slot, int) and 0 <= slot < self.num_slots):
            raise ValueError(f"slot={slot!r}: valid slots are 0..{self.num_slots - 1}")
        for batch, _ in iterate_slot(self._spec, slot, state):
            if batch is not None:
                yield batch

    def _iterate_in_process(self, generation: int) -> Iterator[dict]:
        for batch, state in iterate_slot(self._spec, self.rank, self._states[0]):
            self._record(generation, 0, state)
            if batch is None:
                return
            yield batch

    def _iterate_workers(self, generation: int) -> Iterator[dict]:
        n = self.num_workers
        dataset = RankWorkers(self._spec, self.rank * n, copy.deepcopy(self._states), rotation=self._taken % n)
        exhausted: set[int] = set()
        for item in DataLoader(dataset, batch_size=None, num_workers=n, in_order=True):
            logical = item.pop(SLOT_KEY)
            self._record(generation, logical, item.pop(STATE_KEY))
            if item.pop(EXHAUSTED_KEY, 0):
                exhausted.add(logical)
                if len(exhausted) == n:
                    return
                continue
            yield item

    def _record(self, generation: int, logical_slot: int, state: dict) -> None:
        """Note a batch taken from `logical_slot` (or its end-of-pass marker) and that slot's new state."""
        if generation != self._generation:
            raise RuntimeError("this PackedLoader iterator was replaced by a newer iter(loader) or load_state_dict()")
        self._states[logical_slot] = state
        self._taken += 1

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serializable position of this rank: see `load_state_dict` for the contents."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self._config(),
            "taken": self._taken,
            "slots": copy.deepcopy(self._states),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()` of a loader built with the same arguments).

        state = {"format", "version",
                 "config": {"sources", "shards", "shard_fingerprints", "world_size", "num_workers", "rank",
                            "seed", "split", "val_fraction", "loop", "shuffle_documents",
                            "seq_len", "batch_size", "weights", "interleave"},   # floats as repr strings
                 "taken": batches this rank has taken (markers of finished one-pass slots included),
                 "slots": [{"slot", "rows", "cursors": [[epoch, item, doc, offset] per source],
                            "lanes"/"pending": open documents (interleave.py)} per worker]}
        """
        check_state(state, self._config(), self.rank, self.workers_per_rank)
        self._states, self._taken = copy.deepcopy(state["slots"]), state["taken"]
        self._resume_pending = True
        self._generation += 1

    def resume_from(self, states: list[dict]) -> None:
        """Continue from the states of every rank of a run (`state_dict()` of each, in rank order):
        this rank's own when the run had the same world size and workers, otherwise resharded: each
        old slot's stream goes on in one of this run's slots up to the first epoch no old slot had
        started, and this run's own plans take over from that epoch (streams.py), so no
        document is skipped or read twice."""
        configs = [s.get("config") or {} for s in states] if isinstance(states, list) else []
        same = len(states) == self.world_size and all(
            c.get("world_size") == self.world_size and c.get("num_workers") == self.num_workers for c in configs)
        if same:
            self.load_state_dict(states[self.rank])
            return
        old_slots = check_reshard_states(states, self._config())
        self._states = reshard_slots(old_slots, self._spec, self.num_slots, self.rank, self.workers_per_rank)
        self._taken = 0
        self._resume_pending = True
        self._generation += 1
        if self.rank == 0:
            log.info("data stream resharded: %d slot(s) of %d rank(s) -> %d slot(s) of %d rank(s); the old slots' "
                     "streams finish their epochs in the new slots, no document is skipped or repeated",
                     len(old_slots), len(states), self.num_slots, self.world_size)

    def vocab_info(self) -> dict | None:
        """The first source's manifest `tokenizer` entry (vocab_size, bos/eos/pad ids...), if it has one."""
        return copy.deepcopy(self._tokenizer)

    def _reset_position(self) -> None:
        first = self.rank * self.workers_per_rank
        self._states = [fresh_slot_state(first + w, len(self._spec.sources)) for w in range(self.workers_per_rank)]
        self._taken = 0

    def _config(self) -> dict:
        return copy.deepcopy(self._settings)

    def _describe_settings(self) -> dict:
        """What a state records about the loader that saved it (computed once: it stats every shard)."""
        spec = self._spec
        return {
            "sources": [s.source for s in spec.sources],
            "shards": [len(s) for s in spec.sources],
            "shard_fingerprints": [s.fingerprint() for s in spec.sources],
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "rank": self.rank,
            "seed": spec.seed,
            "split": spec.split,
            "val_fraction": repr(spec.val_fraction),
            "loop": int(spec.loop),
            "shuffle_documents": int(spec.shuffle_documents),
            "seq_len": spec.seq_len,
            "batch_size": spec.batch_size,
            "weights": [repr(w) for w in spec.weights],
            "interleave": spec.interleave,
        }
