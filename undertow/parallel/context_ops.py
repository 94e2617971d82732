"""How each recurrence kernel passes its state under context parallelism (see context_state.py).

Keyed by op name, as the kernels' public functions name themselves to the hook. Every function
reads the op's own arguments (args = the positional inputs, kwargs = the keywords the public
function forwards) and works on this rank's slice. A new recurrence op (mLSTM, ParaRNN's
linearized steps, Titans' memory) adds one `StatePassing` here and the three-line hook in its
public function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts
from undertow.kernels.ssd.reference import ssd_dt
from undertow.parallel.context_state import StatePassing

Args = tuple
Kwargs = dict


def _continuous_rows(doc_ids: torch.Tensor | None, rows: int, length: int, device) -> torch.Tensor:
    """(rows,) float32: 1 where no document starts after the slice's first token, else 0."""
    return (~segment_starts(doc_ids, (rows, length), device).any(1)).float()


def _in_last_segment(doc_ids: torch.Tensor | None, rows: int, length: int, device) -> torch.Tensor | None:
    """(rows, length) bool: the token belongs to the slice's last segment (None: no boundaries)."""
    if doc_ids is None:
        return None
    segment = segment_starts(doc_ids, (rows, length), device).cumsum(1)
    return segment == segment[:, -1:]


# ---- ssd: x (Bt, T, H, P), dt (Bt, T, H), A (H,), B/C (Bt, T, G, N); state (Bt, H, P, N)


def _ssd_step(args: Args, kwargs: Kwargs) -> torch.Tensor:
    dt = args[1]
    return ssd_dt(dt, kwargs.get("dt_bias"), kwargs.get("dt_softplus", True), kwargs.get("dt_limit", (0.0, float("inf"))))


def ssd_transition(args: Args, kwargs: Kwargs) -> torch.Tensor:
    """(Bt, H, 1, 1): exp(A * sum_t dt_t) per row and head."""
    x, A = args[0], args[2]
    step = _ssd_step(args, kwargs)
    decay = torch.exp((step * A.float()).sum(1))  # (Bt, H)
    decay = decay * _continuous_rows(kwargs.get("doc_ids"), x.shape[0], x.shape[1], x.device)[:, None]
    return decay[:, :, None, None]


def ssd_final_from_zero(fn, args: Args, kwargs: Kwargs) -> torch.Tensor:
    """(Bt, H, P, N) = sum_t exp(A * sum_{s>t} dt_s) dt_t x_t B_t^T over the slice's last segment:
    one contraction over time instead of a second scan."""
    x, A, B = args[0], args[2], args[3]
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    step = _ssd_step(args, kwargs)
    log_decay = step * A.float()  # (Bt, T, H)
    after = log_decay.flip(1).cumsum(1).flip(1) - log_decay  # sum over s > t, accumulated from the end
    weight = step * torch.exp(after)
    last = _in_last_segment(kwargs.get("doc_ids"), Bt, T, x.device)
    if last is not None:
        weight = weight * last[..., None]
    xw = (x.float() * weight[..., None]).view(Bt, T, G, H // G, P)
    return torch.einsum("btgkp,btgn->bgkpn", xw, B.float()).reshape(Bt, H, P, N)


# ---- selective_scan: u, delta (Bt, T, Dc), A (Dc, N), B/C (Bt, T, N); state (Bt, Dc, N)


def selective_scan_transition(args: Args, kwargs: Kwargs) -> torch.Tensor:
    """(Bt, Dc, N): exp(A * sum_t dt_t) per row, channel and state."""
    u, delta, A = args[0], args[1], args[2]
    dt = delta.float()
    if kwargs.get("delta_bias") is not None:
        dt = dt + kwargs["delta_bias"].float()
    if kwargs.get("delta_softplus", True):
        dt = F.softplus(dt)
    decay = torch.exp(dt.sum(1)[:, :, None] * A.float())
    return decay * _continuous_rows(kwargs.get("doc_ids"), u.shape[0], u.shape[1], u.device)[:, None, None]


def selective_scan_final_from_zero(fn, args: Args, kwargs: Kwargs) -> torch.Tensor:
    """The scan from a zero state without the output's skip (D) and gate (z), which the state
    does not depend on."""
    local = {**kwargs, "D": None, "z": None, "initial_state": None, "return_final_state": True}
    return fn(*args, **local)[1]


# ---- causal_conv1d: x (Bt, T, D), weight (D, K); state: the last K-1 inputs (Bt, D, K-1)


def causal_conv1d_transition(args: Args, kwargs: Kwargs) -> torch.Tensor:
    """(Bt, 1, 1) zeros: a slice of at least K-1 tokens replaces the whole window."""
    x, weight = args[0], args[1]
    K = weight.shape[1]
    if x.shape[1] < K - 1:
        raise ValueError(f"context parallelism: causal_conv1d of width {K} needs at least {K - 1} tokens per "
                         f"cp rank, got {x.shape[1]}; use fewer cp ranks or longer sequences")
    return x.new_zeros(x.shape[0], 1, 1, dtype=torch.float32)


def causal_conv1d_final_from_zero(fn, args: Args, kwargs: Kwargs) -> torch.Tensor:
    """The halo the next rank needs: the last K-1 inputs, zero where they precede the last segment."""
    x, weight = args[0], args[1]
    K = weight.shape[1]
    window = x[:, x.shape[1] - (K - 1):].float()
    last = _in_last_segment(kwargs.get("doc_ids"), x.shape[0], x.shape[1], x.device)
    if last is not None:
        window = window * last[:, -(K - 1):, None]
    return window.transpose(1, 2)


STATE_PASSING = {
    "ssd": StatePassing(ssd_transition, ssd_final_from_zero),
    "selective_scan": StatePassing(selective_scan_transition, selective_scan_final_from_zero),
    "causal_conv1d": StatePassing(causal_conv1d_transition, causal_conv1d_final_from_zero),
}
