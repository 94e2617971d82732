"""Checks for PackedLoader: its arguments (before any work) and a state it is asked to resume from.

Errors name the field, the value found and what would be valid.
"""

from __future__ import annotations

import math
import numbers

from undertow.log import get_logger
from undertow.pretrain.loader.sources import ShardSet

log = get_logger("pretrain.loader")

STATE_FORMAT, STATE_VERSION = "undertow-packed-loader", 1
# State fields that must match for an exact resume; the others may change (with a warning).
_MUST_MATCH = ("world_size", "num_workers", "rank", "seed", "split", "val_fraction", "loop", "shuffle_documents")
_MAY_CHANGE = ("seq_len", "batch_size", "weights", "interleave")
# What a resharded resume (another world size or number of workers) still needs to match.
_RESHARD_MUST_MATCH = ("seed", "split", "val_fraction", "loop", "shuffle_documents")


def check_state(state: dict, current: dict, rank: int, workers: int) -> None:
    """Check a `PackedLoader.state_dict()` against `current` (the loader's own config entry)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        found = (state.get("format"), state.get("version")) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a PackedLoader state: expected format {STATE_FORMAT!r} v{STATE_VERSION}, got {found!r}")
    _check_config(state.get("config") or {}, current)
    _check_slots(state.get("slots"), rank, workers, len(current["sources"]))
    taken = state.get("taken")
    if not (isinstance(taken, int) and taken >= 0):
        raise ValueError(f"loader state 'taken'={taken!r}: expected an int >= 0")


def check_reshard_states(states, current: dict) -> list[dict]:
    """Check the loader states of every rank of a run with another world size or number of workers
    (a list in rank order) against this loader's config entry; return all their slot states in
    slot order. The settings that decide documents and order must match, as for a plain resume."""
    if not isinstance(states, list) or not states:
        raise ValueError(f"expected the loader states of every rank of the saved run, got {states!r:.200}")
    for rank, state in enumerate(states):
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state of rank {rank} is not a PackedLoader state v{STATE_VERSION}")
        config = state.get("config") or {}
        _check_config(config, current, must_match=_RESHARD_MUST_MATCH)
        layout = (config.get("world_size"), config.get("num_workers"))
        if config.get("rank") != rank or layout != (len(states), states[0]["config"].get("num_workers")):
            raise ValueError(f"loader state {rank} is rank {config.get('rank')!r} of world size {layout[0]!r} "
                             f"({layout[1]!r} workers): expected rank {rank} of the {len(states)} states given")
    workers = max(1, states[0]["config"]["num_workers"])
    slots = []
    for rank, state in enumerate(states):
        _check_slots(state.get("slots"), rank, workers, len(current["sources"]))
        slots.extend(state["slots"])
    return slots


def _check_config(saved: dict, mine: dict, must_match: tuple[str, ...] = _MUST_MATCH) -> None:
    """Compare the saved loader settings with this loader's: refuse what breaks exactness, warn on the rest."""
    problems = [f"{k}: saved {saved.get(k)!r}, this loader {mine[k]!r}" for k in must_match if saved.get(k) != mine[k]]
    per_source = ("sources", "shards", "shard_fingerprints")
    saved_sources = list(zip(*(saved.get(k) or [] for k in per_source)))
    if len(saved_sources) != len(mine["sources"]):
        problems.append(f"sources: saved {saved.get('sources')!r}, this loader {mine['sources']!r}")
    for i, (old, new) in enumerate(zip(saved_sources, zip(*(mine[k] for k in per_source)))):
        if old[1:] != new[1:]:
            problems.append(
                f"sources[{i}]: saved {old[0]!r} ({old[1]} shards, {old[2]}), this loader {new[0]!r} ({new[1]} shards, {new[2]})"
            )
        elif old[0] != new[0]:
            log.warning("sources[%d] moved from %r to %r (same shards): resuming", i, old[0], new[0])
    if problems:
        raise ValueError(
            "the loader state does not match this loader, so it cannot resume exactly:\n  " + "\n  ".join(problems)
        )
    changed = [f"{k} {saved.get(k)!r} -> {mine[k]!r}" for k in _MAY_CHANGE if saved.get(k) != mine[k]]
    if changed:
        log.warning(
            "loader resumed with %s: no document is skipped or repeated, but batches differ from an uninterrupted run",
            ", ".join(changed),
        )


def validate_arguments(args: dict) -> None:
    """Check every argument before any work; errors name the field, the value and what is valid."""

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def require(ok: bool, field: str, valid: str) -> None:
        if not ok:
            raise ValueError(f"PackedLoader {field}={args[field]!r}: {valid}")

    sources = args["sources"]
    require(
        isinstance(sources, (list, tuple)) and len(sources) > 0,
        "sources",
        "expected a non-empty list of source strings",
    )
    require(is_int(args["seq_len"]) and args["seq_len"] >= 2, "seq_len", "expected an int >= 2")
    require(is_int(args["batch_size"]) and args["batch_size"] >= 1, "batch_size", "expected an int >= 1")
    require(is_int(args["world_size"]) and args["world_size"] >= 1, "world_size", "expected an int >= 1")
    require(
        is_int(args["rank"]) and 0 <= args["rank"] < args["world_size"],
        "rank",
        f"expected an int in [0, world_size={args['world_size']})",
    )
    require(is_int(args["num_workers"]) and args["num_workers"] >= 0, "num_workers", "expected an int >= 0")
    require(is_int(args["seed"]) and args["seed"] >= 0, "seed", "expected an int >= 0")
    require(args["split"] in ("train", "val"), "split", "expected 'train' or 'val'")
    vf = args["val_fraction"]
    require(
        isinstance(vf, (int, float)) and not isinstance(vf, bool) and 0 <= vf < 1,
        "val_fraction",
        "expected a number in [0, 1)",
    )
    require(
        args["split"] == "train" or vf > 0,
        "val_fraction",
        "split='val' needs val_fraction > 0 (no document is held out)",
    )
    require(isinstance(args["loop"], bool), "loop", "expected True or False")
    require(isinstance(args["shuffle_documents"], bool), "shuffle_documents", "expected True or False")
    require(is_int(args["interleave"]) and args["interleave"] >= 1, "interleave", "expected an int >= 1")
    weights = args["weights"]
    if weights is not None:
        require(
            isinstance(weights, (list, tuple)) and len(weights) == len(sources),
            "weights",
            f"expected one weight per source ({len(sources)})",
        )
        ok = all(
            isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
        )
        require(ok, "weights", "every weight must be a finite number >= 0")
        require(sum(weights) > 0, "weights", "at least one weight must be > 0")


def common_tokenizer(shard_sets: tuple[ShardSet, ...]) -> dict | None:
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
        well_formed = (
            isinstance(cursors, list)
            and len(cursors) == num_sources
            and all(
                isinstance(c, list) and len(c) == 4 and all(isinstance(v, int) and v >= 0 for v in c) for c in cursors
            )
        )
        if not well_formed:
            bad(
                f"slot {expected}: 'cursors' must be {num_sources} lists [epoch, item, doc, offset] of ints >= 0, got {cursors!r:.200}"
            )
        for entry in slot.get("inherited", []):
            _check_inherited(entry, expected, num_sources, bad)
        for key in ("lanes", "pending"):
            if key in slot:
                _check_documents(slot[key], key, expected, num_sources, bad)


def _check_documents(lists, key: str, slot: int, num_sources: int, bad) -> None:
    """Open documents (interleave.py): per source a list of {slot, num_slots, cursor} (lanes: or null)."""
    def record(r) -> bool:
        return (isinstance(r, dict) and isinstance(r.get("num_slots"), int) and r["num_slots"] >= 1
                and isinstance(r.get("slot"), int) and 0 <= r["slot"] < r["num_slots"]
                and isinstance(r.get("cursor"), list) and len(r["cursor"]) == 4
                and all(isinstance(v, int) and v >= 0 for v in r["cursor"]))
    ok = isinstance(lists, list) and len(lists) == num_sources and all(
        isinstance(docs, list) and all(record(r) or (r is None and key == "lanes") for r in docs) for docs in lists)
    if not ok:
        bad(f"slot {slot}: {key!r} must be {num_sources} lists of {{slot, num_slots, cursor: [epoch, item, doc, "
            f"offset]}}{' or null' if key == 'lanes' else ''}, got {lists!r:.200}")


def _check_inherited(entry, slot: int, num_sources: int, bad) -> None:
    """An old slot's stream a slot inherited at a reshard: {"slot", "num_slots", "until", "cursors"}."""
    def ints(value, n):
        return isinstance(value, list) and len(value) == n and all(isinstance(v, int) and v >= 0 for v in value)

    ok = (isinstance(entry, dict) and isinstance(entry.get("num_slots"), int) and entry["num_slots"] >= 1
          and isinstance(entry.get("slot"), int) and 0 <= entry["slot"] < entry["num_slots"]
          and ints(entry.get("until"), num_sources)
          and isinstance(entry.get("cursors"), list) and len(entry["cursors"]) == num_sources
          and all(ints(c, 4) for c in entry["cursors"]))
    if not ok:
        bad(f"slot {slot}: an 'inherited' entry must be {{slot, num_slots, until: {num_sources} epochs, cursors: "
            f"{num_sources} [epoch, item, doc, offset]}}, got {entry!r:.200}")
