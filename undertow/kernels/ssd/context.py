"""SSD's state math under context parallelism (the StatePassing contract: kernels/context.py).

x (Bt, T, H, P), dt (Bt, T, H), A (H,), B/C (Bt, T, G, N); state (Bt, H, P, N). Over a slice the
state is h_T = exp(A sum_t dt_t) h_0 + sum_t exp(A sum_{s>t} dt_s) dt_t x_t B_t^T.
"""

from __future__ import annotations

import torch

from undertow.kernels.context import StatePassing
from undertow.kernels.dispatch import continuous_rows, in_last_segment
from undertow.kernels.ssd.reference import ssd_dt


def _step(args: tuple, kwargs: dict) -> torch.Tensor:
    dt = args[1]
    return ssd_dt(dt, kwargs.get("dt_bias"), kwargs.get("dt_softplus", True), kwargs.get("dt_limit", (0.0, float("inf"))))


def transition(args: tuple, kwargs: dict) -> torch.Tensor:
    """(Bt, H, 1, 1): exp(A * sum_t dt_t) per row and head."""
    x, A = args[0], args[2]
    decay = torch.exp((_step(args, kwargs) * A.float()).sum(1))  # (Bt, H)
    decay = decay * continuous_rows(kwargs.get("doc_ids"), x.shape[0], x.shape[1], x.device)[:, None]
    return decay[:, :, None, None]


def final_from_zero(fn, args: tuple, kwargs: dict) -> torch.Tensor:
    """(Bt, H, P, N) = sum_t exp(A * sum_{s>t} dt_s) dt_t x_t B_t^T over the slice's last segment:
    one contraction over time instead of a second scan."""
    x, A, B = args[0], args[2], args[3]
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    step = _step(args, kwargs)
    log_decay = step * A.float()  # (Bt, T, H)
    after = log_decay.flip(1).cumsum(1).flip(1) - log_decay  # sum over s > t, accumulated from the end
    weight = step * torch.exp(after)
    last = in_last_segment(kwargs.get("doc_ids"), Bt, T, x.device)
    if last is not None:
        weight = weight * last[..., None]
    xw = (x.float() * weight[..., None]).view(Bt, T, G, H // G, P)
    return torch.einsum("btgkp,btgn->bgkpn", xw, B.float()).reshape(Bt, H, P, N)


STATE_PASSING = StatePassing(transition, final_from_zero)
