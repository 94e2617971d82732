"""The collectives of context parallelism, counted, and the differentiable all-gather along a dim.

Every collective CP issues goes through `all_gather` / `reduce_scatter` here, which add to
`COUNTER` the bytes this rank receives under a ring algorithm (all-gather: (world-1) x the local
tensor; reduce-scatter: (world-1) x one chunk; an all-reduce, used where the backend has no
reduce-scatter, e.g. gloo: 2 (world-1) / world x the full tensor). scripts/bench_cp.py reads it.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist


class CommCounter:
    """Per collective kind: how many calls and how many bytes this rank received."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def add(self, kind: str, nbytes: int) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += int(nbytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


COUNTER = CommCounter()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all ranks), in rank order; no autograd."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor, group=group)
    COUNTER.add("all_gather", (world - 1) * _nbytes(tensor))
    return out


def reduce_scatter(chunks: list[torch.Tensor], group) -> torch.Tensor:
    """The sum over ranks of chunk[rank] (each rank passes one chunk per rank); no autograd."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = [c.contiguous() for c in chunks]
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: all-reduce, keep ours
        full = torch.stack(chunks)
        dist.all_reduce(full, group=group)
        COUNTER.add("all_reduce", 2 * (world - 1) * _nbytes(full) // world)
        return full[rank]
    out = torch.empty_like(chunks[rank])
    dist.reduce_scatter(out, chunks, group=group)
    COUNTER.add("reduce_scatter", (world - 1) * _nbytes(out))
    return out


class _GatherAlongDim(torch.autograd.Function):
    """Forward: concatenate every rank's slice along `dim`. Backward: each rank gets the sum over
    ranks of the gradient of its own slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor, dim, group):
        ctx.dim, ctx.group = dim, group
        return torch.cat(all_gather(tensor, group), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        return reduce_scatter(list(grad.chunk(world, dim=ctx.dim)), ctx.group), None, None


def gather_along_dim(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Differentiable all-gather: (..., n, ...) on each rank -> (..., world * n, ...) in rank order."""
    return _GatherAlongDim.apply(tensor, dim, group)
