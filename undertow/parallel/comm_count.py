"""Count the bytes every collective moves, for any layout: `with count_collectives() as counts:`.

Patches, for the duration of the block, the collectives of torch.distributed that FSDP2
(all_gather_single, reduce_scatter_single) and our own code call (all_reduce, all_gather,
all_gather_into_tensor, reduce_scatter_tensor, reduce_scatter, broadcast, all_to_all_single) and the functional collectives DTensor redistributes
with (torch.distributed._functional_collectives). Each call adds the bytes of the tensor THIS rank
puts in (its payload: the local shard for an all-gather, the full input for an all-reduce or
reduce-scatter) under the collective's name. Payload, not wire traffic: a ring all-reduce of P
bytes sends about 2 (n-1)/n x P per rank; multiply by the algorithm's factor for wire bytes.
Point-to-point sends through `batch_isend_irecv` (how torch's pipeline schedules send activations
and gradients) count as "p2p_send", the bytes this rank sends. Plain `isend`/`send` are not
patched: `P2POp` checks its op by identity.
Benchmarks only (scripts/bench_layouts.py); nothing in training depends on it.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

DIST_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
            "reduce_scatter", "reduce_scatter_single", "broadcast", "all_to_all_single")  # *_single: FSDP2's
FUNCOL_OPS = ("all_reduce", "all_gather_tensor", "all_gather_tensor_autograd", "reduce_scatter_tensor",
              "reduce_scatter_tensor_autograd", "all_to_all_single", "all_to_all_single_autograd")
# which positional argument holds this rank's input
_INPUT_ARG = {"all_gather": 1, "all_gather_into_tensor": 1, "all_gather_single": 1, "reduce_scatter_tensor": 1,
              "reduce_scatter": 1, "reduce_scatter_single": 1, "all_to_all_single": 1}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveCounts:
    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.depth = 0  # a functional collective may call a c10d one: count the outer call only

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _counted(fn, name: str, counts: CollectiveCounts, input_arg: int):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if counts.depth == 0:
            payload = args[input_arg] if len(args) > input_arg else next(iter(kwargs.values()), None)
            counts.calls[name] += 1
            counts.bytes[name] += _nbytes(payload)
        counts.depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            counts.depth -= 1

    return run


def _counted_batch_p2p(fn, counts: CollectiveCounts):
    @functools.wraps(fn)
    def run(ops, *args, **kwargs):
        for op in ops:
            if getattr(op.op, "__name__", "") in ("isend", "send"):
                counts.calls["p2p_send"] += 1
                counts.bytes["p2p_send"] += _nbytes(op.tensor)
        return fn(ops, *args, **kwargs)

    return run


@contextlib.contextmanager
def count_collectives():
    counts = CollectiveCounts()
    saved = []
    for module, names, prefix in ((dist, DIST_OPS, ""), (funcol, FUNCOL_OPS, "functional.")):
        for name in names:
            fn = getattr(module, name, None)
            if fn is None:
                continue
            arg = 0 if module is funcol else _INPUT_ARG.get(name, 0)
            saved.append((module, name, fn))
            setattr(module, name, _counted(fn, prefix + name, counts, arg))
    saved.append((dist, "batch_isend_irecv", dist.batch_isend_irecv))
    dist.batch_isend_irecv = _counted_batch_p2p(dist.batch_isend_irecv, counts)
    try:
        yield counts
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
