"""Mamba-2 SSD, chunked form in PyTorch (autograd gives every gradient); fast on CPU.

The row is cut into chunks of L tokens. With a_t the within-chunk inclusive cumsum of dt*A and
u_t = dt_t * x_t, per head and chunk c:
    intra   y_t += sum_{s<=t, same segment} (C_t . B_s) exp(a_t - a_s) u_s
    inter   y_t += [t still in the segment carried into c] exp(a_t) S_in[c] @ C_t
    state   S_in[c+1] = g_c S_in[c] + sum_{s in the chunk's last segment} exp(a_end - a_s) u_s (outer) B_s
with g_c = exp(a_end) if no document starts inside chunk c, else 0 (the carried state stops).
Every exponent is a difference a_t - a_s with s <= t (<= 0 for A < 0): no overflow.

The intra term is one autograd.Function (`_Intra`) with a hand-written backward, its (L, L) tensors
laid out so each product is a batched matmul without a layout copy; the rest is plain autograd.
Gradient pairs that cancel exactly are kept out of A's gradient (see `_Intra` and `chunk_decays`).

The helpers `check_inputs`, `chunk_decays`, `chunk_segments` and `finish` are shared with the
Triton form, which computes the same three terms in kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import no_autocast, segment_starts
from undertow.kernels.ssd.reference import ssd_dt

LOG2_E = 1.4426950408889634


def check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, doc_ids, chunk_size) -> None:
    """Raise ValueError naming the argument whose shape does not fit x: (Bt, T, H, P)."""
    if x.ndim != 4:
        raise ValueError(f"x must be (Bt, T, H, P), got shape {tuple(x.shape)}")
    Bt, T, H, P = x.shape
    expect = {"dt": (dt, (Bt, T, H)), "A": (A, (H,)), "z": (z, (Bt, T, H, P)), "dt_bias": (dt_bias, (H,)),
              "doc_ids": (doc_ids, (Bt, T))}
    for name, (tensor, shape) in expect.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}, got {tuple(tensor.shape)}")
    if B.ndim != 4 or tuple(B.shape[:2]) != (Bt, T) or B.shape != C.shape:
        raise ValueError(f"B and C must both be (Bt={Bt}, T={T}, G, N), got {tuple(B.shape)} and {tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if H % G != 0:
        raise ValueError(f"heads {H} must be a multiple of groups {G}")
    if D is not None and tuple(D.shape) not in ((H,), (H, P)):
        raise ValueError(f"D must be ({H},) or ({H}, {P}), got {tuple(D.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (Bt, H, P, N):
        raise ValueError(f"initial_state must be {(Bt, H, P, N)}, got {tuple(initial_state.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def chunk_decays(step: torch.Tensor, A: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """step: (Bt, T, H) float32 -> (a, rest), both (Bt, H, nc * chunk) float32: a the inclusive cumsum
    of step * A restarted at every chunk (positions past T continue the last value; they are masked
    anyway), rest_s = sum_{k > s in the chunk} step_k A = a_end - a_s, summed directly: its gradient is
    then a prefix sum, not the difference of two large totals (which lost A's gradient under strong
    decays)."""
    Bt, T, H = step.shape
    nc = math.ceil(T / chunk)
    dA = F.pad(step * A.float(), (0, 0, 0, nc * chunk - T)).view(Bt, nc, chunk, H)  # (Bt, nc, L, H)
    a = dA.cumsum(2)
    rest = dA.flip(2).cumsum(2).flip(2) - dA
    return tuple(v.permute(0, 3, 1, 2).reshape(Bt, H, nc * chunk) for v in (a, rest))


def chunk_segments(doc_ids: torch.Tensor | None, Bt: int, T: int, chunk: int, device):
    """Segment bookkeeping of each chunk.
    Returns seg (Bt, nc*L) int32 (segment number of each token, padding repeats the last),
    seg_ref (Bt, nc) (segment of the token before the chunk: the one its carried state belongs to)
    and ends (nc,) int64 (index of each chunk's last real token)."""
    nc = math.ceil(T / chunk)
    seg = segment_starts(doc_ids, (Bt, T), device).to(torch.int32).cumsum(1, dtype=torch.int32)
    seg = F.pad(seg, (0, nc * chunk - T), mode="replicate") if nc * chunk > T else seg
    ends = torch.clamp(torch.arange(1, nc + 1, device=device) * chunk, max=T) - 1
    seg_ref = torch.zeros(Bt, nc, dtype=torch.int32, device=device)
    seg_ref[:, 1:] = seg[:, chunk - 1:(nc - 1) * chunk:chunk]
    return seg, seg_ref, ends


def finish(y: torch.Tensor, x: torch.Tensor, D, z) -> torch.Tensor:
    """y: (Bt, T, H, P) float32 scan output -> (y + D x) * silu(z), in x's dtype."""
    if D is not None:
        Dv = D.float()
        y = y + (Dv[:, None] if Dv.ndim == 1 else Dv) * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t (Bt, T, ...) with `pad` zero steps appended; t itself when pad is 0 (F.pad would copy)."""
    return F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) if pad else t


LN2 = math.log(2.0)


class _Intra(torch.autograd.Function):
    """The intra-chunk term y_t = sum_{s <= t, same segment} (C_t . B_s) exp2(a_t - a_s) u_s with a
    hand-written backward: its (L, L) tensors per head, laid out (Bt, nc, G, Hg, L, L) so every
    product is a batched matmul without a layout copy, pass through memory a few times fewer than
    under autograd of the same expression (no masked_fill / exp2 / subtraction backward, dA's row
    and column sums from one tensor). Cc, Bc: (Bt, nc, L, G, N); u: (Bt, nc, L, G, Hg, P);
    a: (Bt, nc, G, Hg, L) in log2 units; same: (Bt, nc, L, L) bool (s <= t, one segment).

    dA's gradient: with Q = dscores * scores, a_t gets sum_s Q[t, s] - sum_s Q[s, t] (times ln 2).
    The diagonal (a_t - a_t = 0, decay 1, the largest terms) enters both sums and cancels exactly;
    it is zeroed first, so its float32 residue cannot swamp A's gradient under strong decays."""

    @staticmethod
    def forward(ctx, Cc, Bc, u, a, same):
        with no_autocast(u.device):  # float32 throughout, as the rest of this form
            return _Intra._forward(ctx, Cc, Bc, u, a, same)

    @staticmethod
    def backward(ctx, dy):
        with no_autocast(dy.device):
            return _Intra._backward(ctx, dy.float())

    @staticmethod
    def _forward(ctx, Cc, Bc, u, a, same):
        Bt, nc, L, G, Hg, P = u.shape
        a = a.contiguous()  # the (L, L) tensors below take its layout: batch dims in (Bt, nc, G, Hg) order
        diff = a[..., :, None] - a[..., None, :]  # (Bt, nc, G, Hg, L, L)
        decay = diff.masked_fill_(~same[:, :, None, None], float("-inf")).exp2_()
        CB = torch.matmul(Cc.permute(0, 1, 3, 2, 4), Bc.permute(0, 1, 3, 4, 2))  # (Bt, nc, G, L, L)
        scores = decay * CB[:, :, :, None]
        u_h = u.permute(0, 1, 3, 4, 2, 5).contiguous()  # (Bt, nc, G, Hg, L, P), also for the backward
        y = torch.matmul(scores, u_h)  # (Bt, nc, G, Hg, L, P)
        ctx.save_for_backward(Cc, Bc, u_h, decay, CB)
        return y.permute(0, 1, 4, 2, 3, 5)

    @staticmethod
    def _backward(ctx, dy):
        Cc, Bc, u_h, decay, CB = ctx.saved_tensors
        dy_h = dy.permute(0, 1, 3, 4, 2, 5)  # (Bt, nc, G, Hg, L, P)
        Bt, nc, G, Hg, L, P = dy_h.shape
        scores = (decay * CB[:, :, :, None]).view(-1, L, L)
        dy3 = dy_h.reshape(-1, L, P)
        du = torch.bmm(scores.transpose(1, 2), dy3).view(Bt, nc, G, Hg, L, P).permute(0, 1, 4, 2, 3, 5)
        dscores = torch.bmm(dy3, u_h.view(-1, L, P).transpose(1, 2)).view(Bt, nc, G, Hg, L, L)
        D = dscores.mul_(decay)
        dCB = D.sum(3)  # (Bt, nc, G, L, L)
        Q = D.mul_(CB[:, :, :, None])
        Q.diagonal(dim1=-2, dim2=-1).zero_()
        da = (Q.sum(-1) - Q.sum(-2)).mul_(LN2)  # (Bt, nc, G, Hg, L)
        dC = torch.matmul(dCB, Bc.permute(0, 1, 3, 2, 4)).permute(0, 1, 3, 2, 4)  # (Bt, nc, L, G, N)
        dB = torch.matmul(dCB.transpose(-1, -2), Cc.permute(0, 1, 3, 2, 4)).permute(0, 1, 3, 2, 4)
        return dC, dB, du, da, None


def _scan(x, step, a, rest, B, C, seg, seg_ref, ends, initial_state, chunk):
    """The three chunk terms. x: (Bt, T, H, P); step: (Bt, T, H); a, rest: (Bt, H, nc*L), the
    cumulative decays from each chunk's start and to its end in log2 units (from A * log2(e), see
    chunk_decays); B, C: (Bt, T, G, N).
    Returns y (Bt, T, H, P) float32 and the final state (Bt, H, P, N) float32."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Hg, L = H // G, chunk
    nc = a.shape[-1] // L
    pad = nc * L - T
    u = _pad_time(x.float() * step[..., None], pad).view(Bt, nc, L, G, Hg, P)
    Bc = _pad_time(B.float(), pad).view(Bt, nc, L, G, N)
    Cc = _pad_time(C.float(), pad).view(Bt, nc, L, G, N)
    a = a.view(Bt, G, Hg, nc, L)
    segc = seg.view(Bt, nc, L)
    a_end = a.reshape(Bt, G, Hg, nc * L)[..., ends]  # (Bt, G, Hg, nc)
    seg_end = seg[:, ends]  # (Bt, nc)

    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    same = (segc[:, :, :, None] == segc[:, :, None, :]) & causal  # (Bt, nc, L, L)
    y = _Intra.apply(Cc, Bc, u, a.permute(0, 3, 1, 2, 4), same)  # (Bt, nc, L, G, Hg, P)

    tail = (segc == seg_end[:, :, None])[:, None, None]  # tokens of the chunk's last segment
    to_end = rest.view(Bt, G, Hg, nc, L).masked_fill(~tail, float("-inf")).exp2_()  # (Bt, G, Hg, nc, L)
    chunk_states = torch.einsum("bcsghp,bcsgn->bcghpn", u * to_end.permute(0, 3, 4, 1, 2)[..., None], Bc)
    carry = torch.where(seg_end == seg_ref, 1.0, 0.0)[:, None, None] * a_end.exp2()  # g_c: (Bt, G, Hg, nc)

    S = (initial_state.float().view(Bt, G, Hg, P, N) if initial_state is not None
         else x.new_zeros(Bt, G, Hg, P, N, dtype=torch.float32))
    states_in = []
    # unbind, not chunk_states[:, c]: autograd's backward of unbind is one stack, of each index a
    # zero-filled full-size gradient
    for cs, g in zip(chunk_states.unbind(1), carry[..., None, None].unbind(3)):
        states_in.append(S)
        S = torch.addcmul(cs, g, S)
    S_in = torch.stack(states_in, dim=1)  # (Bt, nc, G, Hg, P, N)

    head = (segc == seg_ref[:, :, None])[:, None, None]  # tokens still in the carried segment
    from_start = a.masked_fill(~head, float("-inf")).exp2_()  # (Bt, G, Hg, nc, L)
    y = torch.addcmul(y, torch.einsum("bctgn,bcghpn->bctghp", Cc, S_in), from_start.permute(0, 3, 4, 1, 2)[..., None])
    return y.reshape(Bt, nc * L, H, P)[:, :T], S.reshape(Bt, H, P, N)


def ssd_chunked(
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
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Same signature and results as `ssd_reference` (see reference.py for shapes), plus `chunk_size`."""
    check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, doc_ids, chunk_size)
    Bt, T = x.shape[:2]
    step = ssd_dt(dt, dt_bias, dt_softplus, dt_limit)
    # Cumulative decays in log2 units: exp2 runs about twice as fast as exp on CPU (Sleef, AVX2).
    a, rest = chunk_decays(step, A.float() * LOG2_E, chunk_size)
    seg, seg_ref, ends = chunk_segments(doc_ids, Bt, T, chunk_size, x.device)
    y, final = _scan(x, step, a, rest, B, C, seg, seg_ref, ends, initial_state, chunk_size)
    y = finish(y, x, D, z)
    return (y, final) if return_final_state else y
