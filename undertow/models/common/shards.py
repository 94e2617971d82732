"""This rank's shard of a tensor that a tensor-parallel plan may have made a DTensor.

Models know nothing of parallelism but this: a mixer that computes with its parameters (or its
input) directly, rather than through an nn.Linear call a plan wraps, asks for the rank's part as a
plain tensor, so the kernels (conv, scans) run on local channels/heads. Without tensor parallelism
both functions return their argument unchanged (one isinstance check).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Shard


def local_shard(t: torch.Tensor | None) -> torch.Tensor | None:
    """The plain tensor of this rank's shard of `t` (`t` itself when it is not a DTensor).

    Gradients: a sharded tensor's gradient is complete on each rank's shard. A replicated tensor
    used for this rank's part of the work (its heads/channels) gets from this rank only that part's
    gradient, so it is marked Partial and DTensor sums it over the ranks in the backward pass.
    """
    if not isinstance(t, DTensor):
        return t
    return t.to_local(grad_placements=[Partial() if p.is_replicate() else p for p in t.placements])


def local_row_parts(t: torch.Tensor | None, sizes: list[int]) -> torch.Tensor | None:
    """Rows of `t` split into consecutive parts of `sizes`, each part's Shard(0) chunk of this rank,
    concatenated: the rows matching channels that are laid out [part 0 | part 1 | ...] globally and
    sharded part by part (Mamba-2's conv over x | B | C). `t` itself when it is not a DTensor.
    """
    if not isinstance(t, DTensor):
        return t
    shard = [Shard(0)] * t.device_mesh.ndim
    return torch.cat([part.redistribute(placements=shard).to_local() for part in t.split(sizes)])
