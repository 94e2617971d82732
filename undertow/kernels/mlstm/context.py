"""The mLSTM's state math under context parallelism (the StatePassing contract: kernels/context.py).

q, k (B, T, H, Dqk), v (B, T, H, Dv), i, f (B, T, H); state (C (B, H, Dqk, Dv), n (B, H, Dqk), m (B, H)),
C and n stored scaled by exp(-m). The true memory exp(m) C after a slice is affine in the one before
it, exp(m_T) C_T = exp(G) exp(m_0) C_0 + exp(X) C_x with G = sum_t logsigmoid(f~_t), and the
stabilizer is a max of the same two terms, m_T = max(m_0 + G, X) (the reference's max unrolls to
it). So a slice passes (C_x, n_x, X), its final state with no contribution of its initial state (X:
the max over its own tokens only, not m_0 = 0's term), and G; `combine` folds them in log space,
never forming exp(m) C (which overflows for large input gates). A document starting inside the
slice stops the carried state: G = -inf there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.context import StatePassing
from undertow.kernels.dispatch import in_last_segment, segment_starts
from undertow.kernels.mlstm.reference import State, compute_dtype


def transition(args: tuple, kwargs: dict) -> torch.Tensor:
    """(B, H): G = sum_t logsigmoid(f~_t) over the slice, -inf for rows in which a document starts
    after the slice's first token."""
    q, f = args[0], args[4]
    G = F.logsigmoid(f.to(compute_dtype(q.dtype))).sum(1)
    starts = segment_starts(kwargs.get("doc_ids"), q.shape[:2], q.device).any(1)
    return G.masked_fill(starts[:, None], float("-inf"))


def final_from_zero(fn, args: tuple, kwargs: dict) -> State:
    """The slice's final state without its initial state's contribution, as one contraction over
    time: X = max over the last document's tokens s of i~_s + sum_{r > s} logsigmoid(f~_r), joined
    by the zero state's m = 0 term (sum of logsigmoid(f~) from the document's start) when that
    document starts inside the slice; C_x = sum_s exp(i~_s + sum_{r > s} lf_r - X) k_s v_s^T, n_x alike."""
    q, k, v, i, f = args
    B, T, H, Dqk = q.shape
    dtype = compute_dtype(q.dtype)
    log_f = F.logsigmoid(f.to(dtype))  # (B, T, H)
    after = log_f.flip(1).cumsum(1).flip(1) - log_f  # sum over r > t
    log_w = i.to(dtype) + after
    last = in_last_segment(kwargs.get("doc_ids"), B, T, q.device)
    if last is None:
        X = log_w.amax(1)
    else:
        log_w = log_w.masked_fill(~last[..., None], float("-inf"))
        X = log_w.amax(1)
        restarted = segment_starts(kwargs["doc_ids"], (B, T), q.device).any(1)  # the last document starts inside
        from_reset = torch.where(last[..., None], log_f, 0.0).sum(1)  # its zero state's m = 0, carried to the end
        X = torch.where(restarted[:, None], torch.maximum(X, from_reset), X)
    w = torch.exp(log_w - X[:, None])  # (B, T, H)
    kw = k.to(dtype) * w[..., None]
    return torch.einsum("bthk,bthv->bhkv", kw, v.to(dtype)), kw.sum(1), X


def combine(prev: State, final: State, G: torch.Tensor) -> State:
    """The state after a slice from the state before it (prev), the slice's `final_from_zero` and its
    transition G: m = max(m_0 + G, X), C = exp(m_0 + G - m) C_0 + exp(X - m) C_x, n alike."""
    (C0, n0, m0), (Cx, nx, X) = prev, final
    carried = m0 + G
    m = torch.maximum(carried, X)
    a, b = torch.exp(carried - m), torch.exp(X - m)
    return (a[..., None, None] * C0 + b[..., None, None] * Cx, a[..., None] * n0 + b[..., None] * nx, m)


STATE_PASSING = StatePassing(transition, final_from_zero, combine)
