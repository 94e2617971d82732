"""Mamba-1 selective scan, chunked over time in PyTorch, with a hand-written backward.

The recurrence h_t = a_t * h_{t-1} + b_t, with a_t = exp(dt_t * A) (0 where a document starts,
which makes the reset exact) and b_t = dt_t * u_t * B_t, is cut into chunks of L steps. Per
chunk, everything but the recurrence itself is a few large vectorized ops over (Bt, L, N, Dc):
the decays and inputs, the contraction of the states with C, and in the backward every
gradient contraction (batched matmuls). The recurrence is one fused multiply-add over
(Bt, N, Dc) per step. Decays are only ever multiplied, never divided, so no exponent is positive
when A <= 0 (Mamba's A = -exp(A_log)); decays under TINY_DECAY are 0.

Why not a parallel form inside the chunk: every (state, channel) pair decays at its own rate, so
the pairwise form with differences of cumulative log-decays needs (L, L, N, Dc) tensors, and a
Hillis-Steele scan passes over the chunk log2(L) times; on CPU both lose to touching each state
once (the Hillis-Steele form took twice as long at T = 2048, Dc = 256, N = 16).

The (Bt, L, N, Dc) states exist for one chunk at a time: the forward keeps only each chunk's
incoming state, and the backward recomputes a chunk's states from it, then runs the adjoint
recurrence g_t = dh_t + a_{t+1} * g_{t+1} backwards through the chunk.

The elementwise parts around the recurrence (softplus and delta_bias, the D skip, the silu(z)
gate) go through ordinary autograd in `selective_scan_from_core`, which the Triton form shares.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts

CHUNK = 32
# Decays below this are taken as 0: their effect is ~1e-23 of a float32 ulp, and keeping them lets
# products fall into subnormal floats, which x86 CPUs process several times slower.
TINY_DECAY = 1e-30


def _transition(dt, A_t, u, B, starts):
    """dt, u: (Bt, L, Dc); A_t: (N, Dc), A transposed; B: (Bt, L, N); starts: (Bt, L) bool.
    Returns a, b: (Bt, L, N, Dc): the decay (0 at document starts) and the input of each step."""
    # exp(-inf) = 0 at document starts: the reset costs no pass of its own.
    reset = torch.zeros_like(dt[:, :, :1]).masked_fill_(starts.unsqueeze(-1), float("-inf")).unsqueeze(-1)
    a = F.threshold_(torch.addcmul(reset, dt.unsqueeze(2), A_t).exp_(), TINY_DECAY, 0.0)
    b = B.unsqueeze(-1) * (dt * u).unsqueeze(2)
    return a, b


def _scan_(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """States h_t = a_t * h_{t-1} + b_t along dim 1 from h_{-1} = h0, written into b and returned.
    a, b: (Bt, L, N, Dc); h0: (Bt, N, Dc). One fused multiply-add over (Bt, N, Dc) per step."""
    h = h0
    for t in range(a.shape[1]):
        h = b[:, t].addcmul_(a[:, t], h)
    return b


def _adjoint_scan_(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Adjoints G_t = d_t + a_{t+1} G_{t+1} along dim 1, from the chunk's last step (G_{L-1} =
    d_{L-1}, which already holds what flows in from later chunks); written into d and returned."""
    for t in range(d.shape[1] - 2, -1, -1):
        d[:, t].addcmul_(a[:, t + 1], d[:, t + 1])
    return d


class _ScanCore(torch.autograd.Function):
    """y_t[d] = sum_n C_t[n] h_t[n, d] over the recurrence above; all tensors float32. States are
    laid out (N, Dc) so that the contractions over n and over d are both batched matmuls."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, starts, chunk):
        Bt, T, Dc = u.shape
        A_t = A.t().contiguous()
        y = u.new_empty(Bt, T, Dc)
        incoming = []
        h = h0.transpose(1, 2)
        for c0 in range(0, T, chunk):
            sl = slice(c0, c0 + chunk)
            incoming.append(h)
            a, b = _transition(dt[:, sl], A_t, u[:, sl], B[:, sl], starts[:, sl])
            H = _scan_(a, b, h)
            y[:, sl] = torch.matmul(C[:, sl].unsqueeze(2), H).squeeze(2)
            h = H[:, -1]
        ctx.save_for_backward(u, dt, A_t, B, C, starts, torch.stack(incoming, 1))
        ctx.chunk = chunk
        ctx.mark_non_differentiable(starts)
        return y, h.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dy, dh_final):
        u, dt, A_t, B, C, starts, incoming = ctx.saved_tensors
        chunk = ctx.chunk
        T = u.shape[1]
        dy = torch.zeros_like(u) if dy is None else dy
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA_t = torch.zeros_like(A_t)
        g = torch.zeros_like(incoming[:, 0]) if dh_final is None else dh_final.transpose(1, 2).clone()
        for i, c0 in reversed(list(enumerate(range(0, T, chunk)))):
            sl = slice(c0, c0 + chunk)
            h_in = incoming[:, i]
            dts, us, Bs, dys = dt[:, sl], u[:, sl], B[:, sl], dy[:, sl]
            a, b = _transition(dts, A_t, us, Bs, starts[:, sl])
            H = _scan_(a, b, h_in)
            dC[:, sl] = torch.matmul(H, dys.unsqueeze(-1)).squeeze(-1)
            direct = C[:, sl].unsqueeze(-1) * dys.unsqueeze(2)
            direct[:, -1] += g
            G = _adjoint_scan_(a, direct)  # d loss / d h_t
            dB[:, sl] = torch.matmul(G, (dts * us).unsqueeze(-1)).squeeze(-1)
            GB = torch.matmul(Bs.unsqueeze(2), G).squeeze(2)
            du[:, sl] = GB * dts
            da = G * a  # times h_{t-1}: d loss / d(dt * A); zero at resets since a is
            da[:, 1:] *= H[:, :-1]
            da[:, 0] *= h_in
            ddt[:, sl] = GB * us + (da * A_t).sum(2)
            dA_t += (da * dts.unsqueeze(2)).flatten(0, 1).sum(0)
            g = a[:, 0] * G[:, 0]
        return du, ddt, dA_t.t(), dB, dC, g.transpose(1, 2), None, None


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, doc_ids):
    Bt, T, Dc = u.shape
    N = A.shape[-1]
    expected = {
        "delta": (delta, (Bt, T, Dc)), "A": (A, (Dc, N)), "B": (B, (Bt, T, N)), "C": (C, (Bt, T, N)),
        "D": (D, (Dc,)), "z": (z, (Bt, T, Dc)), "delta_bias": (delta_bias, (Dc,)),
        "initial_state": (initial_state, (Bt, Dc, N)), "doc_ids": (doc_ids, (Bt, T)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(tensor.shape)}; expected {shape}")


Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def selective_scan_from_core(
    core: Core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, doc_ids, return_final_state
):
    """Shared by the chunked and Triton forms: `core(u, dt, A, B, C, h0, starts)` runs the
    recurrence on float32 dt (Bt, T, Dc) and h0 (Bt, Dc, N) and returns (y_core, final_state)."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, doc_ids)
    Bt, T, Dc = u.shape
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    h0 = initial_state.float() if initial_state is not None else u.new_zeros(Bt, Dc, A.shape[1], dtype=torch.float32)
    starts = segment_starts(doc_ids, (Bt, T), u.device)
    y, h = core(u, dt, A, B, C, h0, starts)
    if D is not None:
        y = y + D.float() * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def _chunked_core(u, dt, A, B, C, h0, starts):
    return _ScanCore.apply(u.float(), dt, A.float(), B.float(), C.float(), h0, starts, CHUNK)


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, *,
    initial_state=None, doc_ids=None, return_final_state=False,
):
    """u, delta, z: (Bt, T, Dc); A: (Dc, N); B, C: (Bt, T, N); D, delta_bias: (Dc,);
    initial_state: (Bt, Dc, N); doc_ids: (Bt, T).
    Returns y (Bt, T, Dc) in u's dtype [, final_state (Bt, Dc, N) float32]."""
    return selective_scan_from_core(
        _chunked_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, doc_ids, return_final_state
    )
