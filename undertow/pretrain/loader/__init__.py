"""The data loader: stream token shards, pack documents into fixed-length rows, resume exactly.

    loader = PackedLoader(["data/web", "data/code"], seq_len=2048, batch_size=8, weights=[0.7, 0.3],
                          rank=rank, world_size=world, num_workers=2, seed=0)
    for batch in loader: ...                      # dicts, see packing.py
    state = loader.state_dict()                   # JSON; save it with the checkpoint (per rank)
    PackedLoader(<same arguments>).load_state_dict(state)   # continues with exactly the next batch

How it fits together (one idea per file):
- sources.py: source strings -> ordered shard lists (tar shards, pipe:/URLs, megatron:PREFIX);
- streams.py: slots (ranks x workers), which documents each slot reads per epoch, val split,
  and the token cursor [epoch, item, doc, offset] that restarts a stream exactly;
- slot.py: per-row blending of sources, packing rows into batches, the per-slot state, and the
  IterableDataset that runs a rank's slots in DataLoader workers;
- packing.py: the batch format, and why consecutive rows overlap by one token;
- checks.py: argument and state validation;
- packed.py: PackedLoader, the cursor over all of it.
tests/pretrain/loader_data.py builds tiny shard sets for tests and rebuilds documents from batches.

Workers and exact resume: with N workers the DataLoader takes batches round-robin from them; each
batch carries its slot's state, the main process keeps the latest state per slot and the number of
batches taken. On resume worker w plays logical slot (w + taken) % N, so the round-robin continues
where it stopped. Slots whose one-pass run ended keep answering with markers (never yielded) so the
round-robin never skips a worker.

Iteration is a cursor: `iter(loader)` continues after the last batch it returned (or from a loaded
state), and an older iterator of the same loader then refuses to go on. A "val" loader starts a fresh
pass on every `iter()` (each evaluation sees the same batches) unless a state was loaded just before.
"""

from undertow.pretrain.loader.packed import PackedLoader
from undertow.pretrain.loader.sources import ShardReadError, resolve_source, resolve_sources

__all__ = ["PackedLoader", "ShardReadError", "resolve_source", "resolve_sources"]
