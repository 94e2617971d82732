"""Mamba-2 state-space duality (SSD), the spec: a sequential loop in float32.

Per head h (with a scalar decay) and group g = h // (H / G) sharing B and C:
    dt_t = softplus(dt_t + dt_bias)  (if dt_softplus), clamped to dt_limit
    S_t  = exp(dt_t * A[h]) * S_{t-1} + dt_t * x_t (outer) B_t[g]     S: (P, N)
    y_t  = S_t @ C_t[g] + D[h] * x_t
    y_t *= silu(z_t)                 (if z is given)

The state resets to zero where a new document starts (doc_ids change); `initial_state` is the
state before the row's first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts


def ssd_dt(dt: torch.Tensor, dt_bias, dt_softplus: bool, dt_limit: tuple[float, float]) -> torch.Tensor:
    """The effective step size, float32: softplus(dt + bias) clamped to dt_limit."""
    out = dt.float()
    if dt_bias is not None:
        out = out + dt_bias.float()
    if dt_softplus:
        out = F.softplus(out)
    if dt_limit != (0.0, float("inf")):
        out = out.clamp(dt_limit[0], dt_limit[1])
    return out


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """x, z: (Bt, T, H, P); dt: (Bt, T, H); A, dt_bias: (H,); B, C: (Bt, T, G, N) with H % G == 0;
    D: (H,) or (H, P); initial_state: (Bt, H, P, N).
    Returns y (Bt, T, H, P) in x's dtype [, final_state (Bt, H, P, N) float32]."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if H % G != 0:
        raise ValueError(f"heads {H} must be a multiple of groups {G}")
    step = ssd_dt(dt, dt_bias, dt_softplus, dt_limit)  # (Bt, T, H)
    heads_per_group = H // G
    Bh = B.float().repeat_interleave(heads_per_group, dim=2)  # (Bt, T, H, N)
    Ch = C.float().repeat_interleave(heads_per_group, dim=2)
    x32 = x.float()
    S = initial_state.float().clone() if initial_state is not None else x.new_zeros(Bt, H, P, N, dtype=torch.float32)
    starts = segment_starts(doc_ids, (Bt, T), x.device)
    ys = []
    for t in range(T):
        S = torch.where(starts[:, t].view(Bt, 1, 1, 1), torch.zeros_like(S), S)
        decay = torch.exp(step[:, t] * A.float())  # (Bt, H)
        S = decay[:, :, None, None] * S + (step[:, t, :, None] * x32[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((S * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        Dv = D.float()
        y = y + (Dv[:, None] if Dv.ndim == 1 else Dv) * x32
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, S) if return_final_state else y
