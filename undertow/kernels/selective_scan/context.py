"""selective_scan's state math under context parallelism (the StatePassing contract: kernels/context.py).

u, delta (Bt, T, Dc), A (Dc, N), B/C (Bt, T, N); state (Bt, Dc, N). Over a slice the state is
h_T = exp(A sum_t dt_t) h_0 + (the scan from a zero state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.context import StatePassing
from undertow.kernels.dispatch import continuous_rows


def transition(args: tuple, kwargs: dict) -> torch.Tensor:
    """(Bt, Dc, N): exp(A * sum_t dt_t) per row, channel and state."""
    u, delta, A = args[0], args[1], args[2]
    dt = delta.float()
    if kwargs.get("delta_bias") is not None:
        dt = dt + kwargs["delta_bias"].float()
    if kwargs.get("delta_softplus", True):
        dt = F.softplus(dt)
    decay = torch.exp(dt.sum(1)[:, :, None] * A.float())
    return decay * continuous_rows(kwargs.get("doc_ids"), u.shape[0], u.shape[1], u.device)[:, None, None]


def final_from_zero(fn, args: tuple, kwargs: dict) -> torch.Tensor:
    """The scan from a zero state without the output's skip (D) and gate (z), which the state
    does not depend on."""
    local = {**kwargs, "D": None, "z": None, "initial_state": None, "return_final_state": True}
    return fn(*args, **local)[1]


STATE_PASSING = StatePassing(transition, final_from_zero)
