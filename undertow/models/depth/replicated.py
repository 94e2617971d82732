"""Replicated tensor-parallel parameters read as plain tensors inside a loop over depth.

Under tensor parallelism the looped part of the depth family (the ACT loop, Huginn's core) runs on
whole, plain tensors that are the same on every rank (plan.py): its attention and MLP matmuls
stay split by heads through their styles, while its small parameters (norm weights, the halting
unit, the adapter) are replicated DTensors. Inside `replicated_as_local(loop)` each of those reads
as its local copy; the gradient goes back as a replicated DTensor, the right placement because
every rank computes the same full gradient from the same inputs (not Partial, which would sum
tp copies). Without tensor parallelism there is nothing to swap and the context is free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.distributed.tensor import DTensor


@contextlib.contextmanager
def replicated_as_local(module: nn.Module) -> Iterator[None]:
    swapped = []
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if isinstance(param, DTensor) and all(p.is_replicate() for p in param.placements):
                sub._parameters[name] = param.to_local(grad_placements=param.placements)
                swapped.append((sub, name, param))
    try:
        yield
    finally:
        for sub, name, param in swapped:
            sub._parameters[name] = param
