"""PackedLoader: stream token shards, pack documents into fixed-length rows, resume exactly.

    loader = PackedLoader(["data/web", "data/code"], seq_len=2048, batch_size=8, weights=[0.7, 0.3],
                          rank=rank, world_size=world, num_workers=2, seed=0)
    for batch in loader: ...                      # dicts, see loader_packing.py
    state = loader.state_dict()                   # JSON; save it with the checkpoint (per rank)
    PackedLoader(<same arguments>).load_state_dict(state)   # continues with exactly the next batch

How it fits together (one idea per file):
- loader_sources.py: source strings -> ordered shard lists (tar shards, pipe:/URLs, megatron:PREFIX);
- loader_streams.py: slots (ranks x workers), which documents each slot reads per epoch, val split,
  and the token cursor [epoch, item, doc, offset] that restarts a stream exactly;
- loader_slot.py: per-row blending of sources, packing rows into batches, the per-slot state, and the
  IterableDataset that runs a rank's slots in DataLoader workers;
- loader_packing.py: the batch format, and why consecutive rows overlap by one token.

Workers and exact resume: with N workers the DataLoader takes batches round-robin from them; each
batch carries its slot's state, the main process keeps the latest state per slot and the number of
batches taken. On resume worker w plays logical slot (w + taken) % N, so the round-robin continues
where it stopped. Slots whose one-pass run ended keep answering with markers (never yielded) so the
round-robin never skips a worker.

Iteration is a cursor: `iter(loader)` continues after the last batch it returned (or from a loaded
state), and an older iterator of the same loader then refuses to go on. A "val" loader starts a fresh
pass on every `iter()` (each evaluation sees the same batches) unless a state was loaded just before.
"""

from __future__ import annotations

import copy
import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from undertow.log import get_logger
from undertow.pretrain.loader_slot import (
    EXHAUSTED_KEY,
    SLOT_KEY,
    STATE_KEY,
    LoaderSpec,
    RankWorkers,
    fresh_slot_state,
    iterate_slot,
)
from undertow.pretrain.loader_sources import ShardSet, resolve_source

log = get_logger("pretrain.loader")

STATE_FORMAT, STATE_VERSION = "undertow-packed-loader", 1
# State fields that must match for an exact resume; the others may change (with a warning).
_MUST_MATCH = ("world_size", "num_workers", "rank", "seed", "split", "val_fraction", "loop", "shuffle_documents")
_MAY_CHANGE = ("seq_len", "batch_size", "weights")


class PackedLoader:
    """Packed, blended, resumable batches for one rank. See the module docstring and loader_packing.py.

    Args:
        sources: source strings (see loader_sources.py): manifest directories, tar paths/globs/brace
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
    ):
        _validate_arguments(locals())
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers_per_rank = max(1, num_workers)
        self.num_slots = world_size * self.workers_per_rank
        shard_sets = tuple(resolve_source(s, f"sources[{i}]") for i, s in enumerate(sources))
        tokenizer = _common_tokenizer(shard_sets)
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
        )
        self._tokenizer = shard_sets[0].tokenizer
        self._reset_position()
        self._resume_pending, self._generation = False, 0
        log.info(
            "PackedLoader %s: %d source(s) (%s shards), rank %d of %d with %d slot(s), %d x %d tokens per batch%s",
            split, len(sources), "+".join(str(len(s)) for s in shard_sets), rank, world_size,
            self.workers_per_rank, batch_size, seq_len, "" if self._spec.loop else ", one pass",
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
                            "seq_len", "batch_size", "weights"},   # floats as repr strings
                 "taken": batches this rank has taken (markers of finished one-pass slots included),
                 "slots": [{"slot", "rows", "cursors": [[epoch, item, doc, offset] per source]} per worker]}
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            found = (state.get("format"), state.get("version")) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a PackedLoader state: expected format {STATE_FORMAT!r} v{STATE_VERSION}, got {found!r}")
        self._check_config(state.get("config", {}))
        slots, taken = state.get("slots"), state.get("taken")
        _check_slots(slots, self.rank, self.workers_per_rank, len(self._spec.sources))
        if not (isinstance(taken, int) and taken >= 0):
            raise ValueError(f"loader state 'taken'={taken!r}: expected an int >= 0")
        self._states, self._taken = copy.deepcopy(slots), taken
        self._resume_pending = True
        self._generation += 1

    def vocab_info(self) -> dict | None:
        """The first source's manifest `tokenizer` entry (vocab_size, bos/eos/pad ids...), if it has one."""
        return copy.deepcopy(self._tokenizer)

    def _reset_position(self) -> None:
        first = self.rank * self.workers_per_rank
        self._states = [fresh_slot_state(first + w, len(self._spec.sources)) for w in range(self.workers_per_rank)]
        self._taken = 0

    def _config(self) -> dict:
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
        }

    def _check_config(self, saved: dict) -> None:
        mine = self._config()
        problems = [f"{k}: saved {saved.get(k)!r}, this loader {mine[k]!r}" for k in _MUST_MATCH if saved.get(k) != mine[k]]
        per_source = ("sources", "shards", "shard_fingerprints")
        saved_sources = list(zip(*(saved.get(k) or [] for k in per_source)))
        if len(saved_sources) != len(mine["sources"]):
            problems.append(f"sources: saved {saved.get('sources')!r}, this loader {mine['sources']!r}")
        for i, (old, new) in enumerate(zip(saved_sources, zip(*(mine[k] for k in per_source)))):
            if old[1:] != new[1:]:
                problems.append(f"sources[{i}]: saved {old[0]!r} ({old[1]} shards, {old[2]}), this loader {new[0]!r} ({new[1]} shards, {new[2]})")
            elif old[0] != new[0]:
                log.warning("sources[%d] moved from %r to %r (same shards): resuming", i, old[0], new[0])
        if problems:
            raise ValueError("the loader state does not match this loader, so it cannot resume exactly:\n  " + "\n  ".join(problems))
        changed = [f"{k} {saved.get(k)!r} -> {mine[k]!r}" for k in _MAY_CHANGE if saved.get(k) != mine[k]]
        if changed:
            log.warning("loader resumed with %s: no document is skipped or repeated, but batches differ from an uninterrupted run", ", ".join(changed))


def _validate_arguments(args: dict) -> None:
    """Check every argument before any work; errors name the field, the value and what is valid."""

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def require(ok: bool, field: str, valid: str) -> None:
        if not ok:
            raise ValueError(f"PackedLoader {field}={args[field]!r}: {valid}")

    sources = args["sources"]
    require(isinstance(sources, (list, tuple)) and len(sources) > 0, "sources", "expected a non-empty list of source strings")
    require(is_int(args["seq_len"]) and args["seq_len"] >= 2, "seq_len", "expected an int >= 2")
    require(is_int(args["batch_size"]) and args["batch_size"] >= 1, "batch_size", "expected an int >= 1")
    require(is_int(args["world_size"]) and args["world_size"] >= 1, "world_size", "expected an int >= 1")
    require(is_int(args["rank"]) and 0 <= args["rank"] < args["world_size"], "rank", f"expected an int in [0, world_size={args['world_size']})")
    require(is_int(args["num_workers"]) and args["num_workers"] >= 0, "num_workers", "expected an int >= 0")
    require(is_int(args["seed"]) and args["seed"] >= 0, "seed", "expected an int >= 0")
    require(args["split"] in ("train", "val"), "split", "expected 'train' or 'val'")
    vf = args["val_fraction"]
    require(isinstance(vf, (int, float)) and not isinstance(vf, bool) and 0 <= vf < 1, "val_fraction", "expected a number in [0, 1)")
    require(args["split"] == "train" or vf > 0, "val_fraction", "split='val' needs val_fraction > 0 (no document is held out)")
    require(isinstance(args["loop"], bool), "loop", "expected True or False")
    require(isinstance(args["shuffle_documents"], bool), "shuffle_documents", "expected True or False")
    weights = args["weights"]
    if weights is not None:
        require(isinstance(weights, (list, tuple)) and len(weights) == len(sources), "weights", f"expected one weight per source ({len(sources)})")
        ok = all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights)
        require(ok, "weights", "every weight must be a finite number >= 0")
        require(sum(weights) > 0, "weights", "at least one weight must be > 0")


def _common_tokenizer(shard_sets: tuple[ShardSet, ...]) -> dict | None:
    """The tokenizer entry the sources agree on (first one found); different tokenizers are an error."""
    found = [(s.source, s.tokenizer) for s in shard_sets if s.tokenizer]
    for source, tok in found[1:]:
        first_source, first = found[0]
        same = tok.get("sha256") == first.get("sha256") and tok.get("vocab_size") == first.get("vocab_size")
        if not same:
            raise ValueError(
                f"sources {first_source!r} and {source!r} were tokenized differently "
                f"({first.get('sha256')!r}/{first.get('vocab_size')} vs {tok.get('sha256')!r}/{tok.get('vocab_size')}): "
                "blending them would mix token ids"
            )
    return found[0][1] if found else None


def _check_slots(slots, rank: int, workers: int, num_sources: int) -> None:
    def bad(why: str):
        raise ValueError(f"loader state 'slots': {why}")

    if not isinstance(slots, list) or len(slots) != workers:
        bad(f"expected a list of {workers} slot states (one per worker), got {slots!r:.200}")
    for w, slot in enumerate(slots):
        expected = rank * workers + w
        if not isinstance(slot, dict) or slot.get("slot") != expected:
            bad(f"entry {w} should be slot {expected} (rank {rank}, worker {w}), got {slot!r:.200}")
        if not (isinstance(slot.get("rows"), int) and slot["rows"] >= 0):
            bad(f"slot {expected}: 'rows' must be an int >= 0, got {slot.get('rows')!r}")
        cursors = slot.get("cursors")
        well_formed = isinstance(cursors, list) and len(cursors) == num_sources and all(
            isinstance(c, list) and len(c) == 4 and all(isinstance(v, int) and v >= 0 for v in c) for c in cursors
        )
        if not well_formed:
            bad(f"slot {expected}: 'cursors' must be {num_sources} lists [epoch, item, doc, offset] of ints >= 0, got {cursors!r:.200}")
