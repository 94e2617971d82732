"""The two places where a dense ParaRNN layer (heads = 1) needs the other tensor-parallel ranks.

With `heads` channel groups and tp dividing them, a rank holds whole groups and computes alone
(plan.py). With heads = 1 the input projection B is one dense (3 D, D) matrix and the gated norm
one group over all D channels; tensor parallelism then splits B by output channel (each rank its
channels' three gates) and everything per channel stays local, except:

  gather_channels   B reads every convolved channel: the rank's channels c (B, T, D/tp) are
                    all-gathered to (B, T, D) before B (backward: the ranks' partial gradients
                    reduce-scattered back to each rank's channels)
  sum_over_shards   the norm's mean square runs over all D channels: each rank's sum of squares
                    (..., 1) is all-reduced (backward: the gradient goes to every rank's part)

Both are no-ops on plain tensors (no tensor parallelism). They read the mesh and the placement from
the parameter the rank's shard belongs to (a DTensor under a plan), so the model names no process
group (models/common/shards.py is the same idea for parameters).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard


def gather_channels(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x (..., D_local): this rank's channels, split over the mesh dims on which `like` is a Shard
    -> (..., D) every channel, in rank order. `x` itself when `like` is not a DTensor."""
    if not isinstance(like, DTensor):
        return x
    split = [Shard(x.ndim - 1) if isinstance(p, Shard) else Replicate() for p in like.placements]
    partial = [Partial() if isinstance(p, Shard) else Replicate() for p in like.placements]
    whole = DTensor.from_local(x, like.device_mesh, split, run_check=False)
    # every rank uses all channels for its own outputs: its gradient is its part of a sum
    return whole.redistribute(placements=[Replicate()] * len(split)).to_local(grad_placements=partial)


def sum_over_shards(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x: this rank's part of a sum over channels split as `like` is -> the sum over all ranks (the
    same shape). `x` itself when `like` is not a DTensor."""
    if not isinstance(like, DTensor):
        return x
    parts = [Partial() if isinstance(p, Shard) else Replicate() for p in like.placements]
    total = DTensor.from_local(x, like.device_mesh, parts, run_check=False)
    return total.redistribute(placements=[Replicate()] * len(parts)).to_local(grad_placements=parts)
