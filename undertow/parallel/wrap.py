"""Per-block wrappers applied from outside the model: activation checkpointing and torch.compile.

Both act in place on each block of `model.layers` and keep parameter names unchanged, so
checkpoints are interchangeable between runs with and without them.
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList to wrap")
    return layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    for block in _blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block separately (blocks share one graph, so compile time stays flat in depth)."""
    for block in _blocks(model):
        block.compile(dynamic=False)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
