"""causal_conv1d's state math under context parallelism (the StatePassing contract: kernels/context.py).

x (Bt, T, D), weight (D, K); state: the last K-1 inputs (Bt, D, K-1). A slice of at least K-1
tokens replaces the whole window, so the transition is zero and the state is the slice's tail.
"""

from __future__ import annotations

import torch

from undertow.kernels.context import StatePassing
from undertow.kernels.dispatch import in_last_segment


def transition(args: tuple, kwargs: dict) -> torch.Tensor:
    """(Bt, 1, 1) zeros: a slice of at least K-1 tokens replaces the whole window."""
    x, weight = args[0], args[1]
    K = weight.shape[1]
    if x.shape[1] < K - 1:
        raise ValueError(f"context parallelism: causal_conv1d of width {K} needs at least {K - 1} tokens per "
                         f"cp rank, got {x.shape[1]}; use fewer cp ranks or longer sequences")
    return x.new_zeros(x.shape[0], 1, 1, dtype=torch.float32)


def final_from_zero(fn, args: tuple, kwargs: dict) -> torch.Tensor:
    """The halo the next rank needs: the last K-1 inputs, zero where they precede the last segment."""
    x, weight = args[0], args[1]
    K = weight.shape[1]
    window = x[:, x.shape[1] - (K - 1):].float()
    last = in_last_segment(kwargs.get("doc_ids"), x.shape[0], x.shape[1], x.device)
    if last is not None:
        window = window * last[:, -(K - 1):, None]
    return window.transpose(1, 2)


STATE_PASSING = StatePassing(transition, final_from_zero)
