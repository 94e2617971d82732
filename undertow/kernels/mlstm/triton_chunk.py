"""mLSTM in Triton, chunkwise (TFLA-style two-level tiling): the math of chunked.py, same stabilizers,
so the result is the reference's function regrouped (docs/mlstm_kernel_notes.md, "Chunkwise Triton").

Forward, two kernels:
  1. `_chunk_states`, one program per (v tile, batch * head), sequential over the chunks: the state
     (C, n, m) before every chunk and after the last token, the inter-chunk recurrence with chunked.py's
     max stabilizer m_{c+1} = max(g_e, max_s D[e, s]) (e the chunk's last real token). C's update is one
     tl.dot a chunk: (K * w)^T V, w_s = exp(D[e, s] - m_{c+1}).
  2. `_chunk_outputs`, one program per (chunk, batch * head, v tile), all in parallel: the chunk's h
     from its start state (q^T C_c, q^T n_c) plus the intra-chunk causal part (q k^T masked by the
     document-causal log weights D) with tl.dot. Two levels: the grid tiles tokens (chunks) and the
     value head dim (v tiles); each program holds all of Dqk (<= 256).
Both kernels rebuild D from the chunk's gates the same way: base_t = sum of logsigmoid(f~) over t's
document inside the chunk up to t, D[t, s] = base_t - base_s + i~_s (s <= t, same document).

Backward (triton_chunk_bwd.py): exact, in Triton in the same tiling (a reverse recurrence of the state
adjoints, then two kernels parallel over chunks) plus a PyTorch pass over per-token scalars for the
stabilizer's chain: every gradient (q, k, v, i~, f~, initial C, n, m), the max(|n^T q|, exp(-m))
branch and torch.maximum's ties as the reference takes them. UNDERTOW_MLSTM_CHUNK_BWD=pytorch swaps it
for autograd through chunked.py recomputed (same gradients, PyTorch speed; a cross-check). Saved for
it: the inputs, h, the NC + 1 chunk states and three (B, T, H) float32 scalars (m_t, den_t, inter_t).

Document resets: the token's segment id (cumulative count of starts, reference.py's rule) decides
which tokens share a document; a chunk's first tokens are "carried" (see the carried state) while in
the segment of the token before the chunk. Lengths need not be multiples of the chunk: masked tails.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from undertow.kernels.dispatch import no_autocast, segment_starts
from undertow.kernels.mlstm.chunked import mlstm_chunked
from undertow.kernels.mlstm.reference import State, check_inputs
from undertow.kernels.mlstm.triton_chunk_bwd import chunk_backward
from undertow.kernels.mlstm.triton_chunk_common import MAX_DQK, NUM_WARPS, _blocks, _chunk_gates, _dot
from undertow.kernels.mlstm.triton_tile import _initial_state, _state_tile


@triton.jit
def _chunk_states(Q, K, V, I, F, SEG, C0, N0, M0, CS, NS, MS,
                  T, H, Dqk, Dv, L, NC,
                  HAS_INIT: tl.constexpr, IS_F32: tl.constexpr,
                  BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """CS (B, H, NC + 1, Dqk, Dv), NS (B, H, NC + 1, Dqk), MS (B, H, NC + 1) float32: the state before
    each chunk, the last one after the row. The first v tile writes n and m (they do not depend on v)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kk, vv, kmask, vmask, cmask, c_off, n_mask = _state_tile(pid_v, Dqk, Dv, BK, BV)
    first = pid_v == 0  # n and m: written by the first v tile only
    C, n, m = _initial_state(C0, N0, M0, bh, kk, kmask, c_off, cmask, Dqk, Dv, HAS_INIT, BK, BV)
    for c in range(NC):
        ck = bh * (NC + 1) + c
        tl.store(CS + ck * Dqk * Dv + c_off, C, mask=cmask)
        tl.store(NS + ck * Dqk + kk, n, mask=n_mask)
        tl.store(MS + ck, m, mask=first)
        same, base, offs, carried, tt = _chunk_gates(I, F, SEG, b, h, c, T, H, L, BL)
        e = tl.minimum(L, T - c * L) - 1  # the chunk's last real token
        at_e = tt == e
        in_e = tl.sum(tl.where(at_e[:, None] & same, 1, 0), axis=0) > 0  # same[e, s]
        d_end = tl.sum(tl.where(at_e, base, 0.0), axis=0) + offs  # D[e, s]
        top = tl.max(tl.where(in_e, d_end, float("-inf")), axis=0)
        keep = tl.sum(tl.where(at_e & carried, 1, 0), axis=0) > 0
        g = tl.sum(tl.where(at_e, base, 0.0), axis=0) + tl.where(keep, m, 0.0)
        m = tl.maximum(g, top)
        decay = tl.where(keep, tl.exp(g - m), 0.0)
        w = tl.exp(tl.where(in_e, d_end - m, float("-inf")))  # (BL,), 0 off e's document
        pos = c * L + tt
        real = (tt < L) & (pos < T)
        row = (b * T + pos) * H + h
        k = tl.load(K + row[:, None] * Dqk + kk[None, :], mask=real[:, None] & kmask[None, :], other=0.0)
        v = tl.load(V + row[:, None] * Dv + vv[None, :], mask=real[:, None] & vmask[None, :], other=0.0)
        kw = k.to(tl.float32) * w[:, None]
        C = decay * C + _dot(tl.trans(kw), v, IS_F32)
        n = decay * n + tl.sum(kw, axis=0)
    ck = bh * (NC + 1) + NC
    tl.store(CS + ck * Dqk * Dv + c_off, C, mask=cmask)
    tl.store(NS + ck * Dqk + kk, n, mask=n_mask)
    tl.store(MS + ck, m, mask=first)


@triton.jit
def _chunk_outputs(Q, K, V, I, F, SEG, CS, NS, MS, Hout, MT, DEN, INTER,
                   T, H, Dqk, Dv, L, NC, scale, eps,
                   IS_F32: tl.constexpr, STORE: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Hout (B, T, H, Dv) in q's dtype: chunk c's outputs, chunked.py's formula:
    h_t = scale [inter_t q_t^T C_c + sum_s exp(D[t, s] - m_t) (q_t . k_s) v_s] / (max(|den_t|, exp(-m_t)) + eps).
    With STORE (a gradient is wanted) the first v tile also writes, per token ((B, T, H) float32 each),
    what the backward reuses: m_t, den_t and inter_t."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    b, h = bh // H, bh % H
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    kmask, vmask = kk < Dqk, vv < Dv
    ck = bh * (NC + 1) + c
    C = tl.load(CS + ck * Dqk * Dv + kk[:, None] * Dv + vv[None, :], mask=kmask[:, None] & vmask[None, :], other=0.0)
    n = tl.load(NS + ck * Dqk + kk, mask=kmask, other=0.0)
    m_c = tl.load(MS + ck)
    same, base, offs, carried, tt = _chunk_gates(I, F, SEG, b, h, c, T, H, L, BL)
    D = base[:, None] + offs[None, :]
    g = base + tl.where(carried, m_c, 0.0)
    m = tl.maximum(g, tl.max(tl.where(same, D, float("-inf")), axis=1))  # the reference's m_t
    pos = c * L + tt
    real = (tt < L) & (pos < T)
    row = (b * T + pos) * H + h
    q = tl.load(Q + row[:, None] * Dqk + kk[None, :], mask=real[:, None] & kmask[None, :], other=0.0)
    k = tl.load(K + row[:, None] * Dqk + kk[None, :], mask=real[:, None] & kmask[None, :], other=0.0)
    v = tl.load(V + row[:, None] * Dv + vv[None, :], mask=real[:, None] & vmask[None, :], other=0.0)
    scores = _dot(q, tl.trans(k), IS_F32) * tl.exp(tl.where(same, D - m[:, None], float("-inf")))  # q unscaled
    inter = tl.where(carried, tl.exp(g - m), 0.0)  # the carried state's weight
    qn = tl.sum(q.to(tl.float32) * n[None, :], axis=1)
    den = (tl.sum(scores, axis=1) + inter * qn) * scale
    factor = scale / (tl.maximum(tl.abs(den), tl.exp(-m)) + eps)
    num = _dot(scores, v, IS_F32) + inter[:, None] * _dot(q, C, IS_F32)
    out = num * factor[:, None]
    tl.store(Hout + row[:, None] * Dv + vv[None, :], out.to(Hout.dtype.element_ty), mask=real[:, None] & vmask[None, :])
    if STORE:
        own = real & (tt < tl.where(pid_v == 0, BL, 0))
        tl.store(MT + row, m, mask=own)
        tl.store(DEN + row, den, mask=own)
        tl.store(INTER + row, inter, mask=own)


def chunk_forward(q, k, v, i, f, C0, n0, m0, seg, eps: float, L: int, store: bool = False):
    """The two forward kernels. q, k (B, T, H, Dqk), v (B, T, H, Dv) contiguous, one dtype; i, f (B, T, H);
    C0, n0, m0 float32 or None (the zero state); seg (B, T) int32 segment ids. Returns h (B, T, H, Dv) in
    q's dtype, the states (C, n, m) before every chunk and after the row ((B, H, NC + 1, ...) float32;
    index NC is the final state) and, with `store`, the per-token tensors of `_chunk_outputs` (else None)."""
    B, T, H, Dqk = q.shape
    Dv = v.shape[3]
    BL, BK, BV, NV = _blocks(L, Dqk, Dv)
    NC = math.ceil(T / L)
    dev, f32 = q.device, torch.float32
    CS = torch.empty(B, H, NC + 1, Dqk, Dv, device=dev, dtype=f32)
    NS = torch.empty(B, H, NC + 1, Dqk, device=dev, dtype=f32)
    MS = torch.empty(B, H, NC + 1, device=dev, dtype=f32)
    has_init = C0 is not None
    init = (C0, n0, m0) if has_init else (CS, NS, MS)  # unread without HAS_INIT
    is_f32 = q.dtype == torch.float32
    _chunk_states[(NV, B * H)](q, k, v, i, f, seg, *init, CS, NS, MS, T, H, Dqk, Dv, L, NC,
                               HAS_INIT=has_init, IS_F32=is_f32, BL=BL, BK=BK, BV=BV, num_warps=NUM_WARPS)
    h = torch.empty(B, T, H, Dv, device=dev, dtype=q.dtype)
    per_token = [torch.empty(B, T, H, device=dev, dtype=f32) for _ in range(3)] if store else [MS] * 3
    _chunk_outputs[(NC, B * H, NV)](q, k, v, i, f, seg, CS, NS, MS, h, *per_token,
                                    T, H, Dqk, Dv, L, NC, Dqk ** -0.5, eps,
                                    IS_F32=is_f32, STORE=store, BL=BL, BK=BK, BV=BV, num_warps=NUM_WARPS)
    return h, (CS, NS, MS), (per_token if store else None)


BWD_ENV = "UNDERTOW_MLSTM_CHUNK_BWD"  # "triton" (default) or "pytorch": the backward's form
BWD_FORMS = ("triton", "pytorch")


def _backward_form() -> str:
    form = os.environ.get(BWD_ENV, "triton")
    if form not in BWD_FORMS:
        raise ValueError(f"{BWD_ENV}={form!r}: choose one of {BWD_FORMS}")
    return form


class _MLSTMChunkTriton(torch.autograd.Function):
    """(q, k, v, i, f, C0, n0, m0 float32 or None, doc_ids or None, eps, chunk) -> (h, C, n, m)."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, doc_ids, eps, chunk):
        B, T = q.shape[:2]
        L = min(chunk, T)
        seg = segment_starts(doc_ids, (B, T), q.device).cumsum(1).to(torch.int32).contiguous()
        init = (None, None, None) if C0 is None else tuple(s.float().contiguous() for s in (C0, n0, m0))
        dtype = q.dtype
        q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
        i, f = i.contiguous(), f.contiguous()
        form = _backward_form() if any(ctx.needs_input_grad) else None
        h, states, per_token = chunk_forward(q, k, v, i, f, *init, seg, eps, L, store=form == "triton")
        if form == "triton":
            ctx.save_for_backward(q, k, v, i, f, seg, doc_ids, h, *states, *per_token)
        elif form == "pytorch":
            ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, doc_ids)
        ctx.eps, ctx.chunk, ctx.L, ctx.form, ctx.has_init = eps, chunk, L, form, C0 is not None
        NC = states[0].shape[2] - 1
        return h, *(s[:, :, NC] for s in states)

    @staticmethod
    def backward(ctx, dh, dC, dn, dm):
        if ctx.form == "pytorch":
            return _backward_pytorch(ctx, dh, dC, dn, dm)
        q, k, v, i, f, seg, doc_ids, h, CS, NS, MS, *per_token = ctx.saved_tensors
        dq, dk, dv, di, df, dC0, dn0, dm0 = chunk_backward(q, k, v, i, f, seg, doc_ids, h, (CS, NS, MS), per_token,
                                                           dh, dC, dn, dm, ctx.eps, ctx.L)
        grads = [g.to(x.dtype) for g, x in zip((dq, dk, dv, di, df), (q, k, v, i, f))]
        init_grads = (dC0, dn0, dm0) if ctx.has_init else (None, None, None)
        return (*grads, *init_grads, None, None, None)


def _backward_pytorch(ctx, dh, dC, dn, dm):
    """The same gradients by autograd through chunked.py recomputed (a cross-check and fallback)."""
    q, k, v, i, f, C0, n0, m0, doc_ids = ctx.saved_tensors
    leaves = [x.detach().requires_grad_() for x in (q, k, v, i, f)]
    init = [s.detach().requires_grad_() for s in (C0, n0, m0)] if ctx.has_init else None
    with torch.enable_grad():
        h, (C, n, m) = mlstm_chunked(*leaves, eps=ctx.eps, chunk_size=ctx.chunk, initial_state=init,
                                     doc_ids=doc_ids, return_final_state=True)
        grads = torch.autograd.grad((h, C, n, m), leaves + (init or []), (dh, dC, dn, dm), allow_unused=True)
    init_grads = tuple(grads[5:]) if ctx.has_init else (None, None, None)
    return (*grads[:5], *init_grads, None, None, None)


def mlstm_triton_chunk(q, k, v, i, f, *, eps: float = 1e-6, chunk_size: int = 64,
                       initial_state: State | None = None, doc_ids=None, return_final_state: bool = False):
    """Same contract as `mlstm_reference` (reference.py); any `chunk_size` (the kernels' token tile is
    its next power of two, at least 16). float32, float16 or bfloat16 inputs; q, k, v computed in q's
    dtype (tl.dot operands), gates and states in float32."""
    check_inputs(q, k, v, i, f, initial_state, doc_ids, chunk_size)
    if q.dtype == torch.float64:
        raise ValueError("mlstm backend 'triton' computes in float32: use 'chunked' or 'reference' for float64")
    if q.shape[3] > MAX_DQK:
        raise ValueError(f"mlstm backend 'triton': the q/k head dim Dqk={q.shape[3]} is above the chunkwise kernels' "
                         f"{MAX_DQK} (one tile); use Dqk <= {MAX_DQK}, or UNDERTOW_MLSTM_TRITON=recurrent or 'chunked'")
    C0, n0, m0 = (None, None, None) if initial_state is None else initial_state
    with no_autocast(q.device):
        h, C, n, m = _MLSTMChunkTriton.apply(q, k, v, i, f, C0, n0, m0, doc_ids, eps, chunk_size)
    return (h, (C, n, m)) if return_final_state else h
