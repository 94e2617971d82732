"""Mamba-1 selective scan, the spec: a sequential loop in float32.

    dt_t   = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t    = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t    per channel d and state n
    y_t    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]
    y_t   *= silu(z_t)                                   (if z is given)

The state resets to zero where a new document starts (doc_ids change); `initial_state` is the
state before the row's first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    *,
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """u, delta, z: (Bt, T, Dc); A: (Dc, N); B, C: (Bt, T, N); D, delta_bias: (Dc,);
    initial_state: (Bt, Dc, N). Returns y (Bt, T, Dc) in u's dtype [, final_state (Bt, Dc, N) float32]."""
    Bt, T, Dc = u.shape
    N = A.shape[1]
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    A32, u32, B32, C32 = A.float(), u.float(), B.float(), C.float()
    h = initial_state.float().clone() if initial_state is not None else u.new_zeros(Bt, Dc, N, dtype=torch.float32)
    starts = segment_starts(doc_ids, (Bt, T), u.device)
    ys = []
    for t in range(T):
        h = torch.where(starts[:, t].view(Bt, 1, 1), torch.zeros_like(h), h)
        decay = torch.exp(dt[:, t, :, None] * A32)  # (Bt, Dc, N)
        h = decay * h + (dt[:, t] * u32[:, t])[:, :, None] * B32[:, t, None, :]
        ys.append((h * C32[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.float() * u32
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y
