"""Triton kernels of Titans' linear memory (one matrix W per head), the chunk algebra of chunked.py's
`_chunk` for depth 1 and window 1 (triton_linear.py has the math, the launch and the autograd glue).

Two levels, as TFLA / SSD: a sequential level whose grid is (v tile, batch * head) -- a program holds its
columns of the state (W, S: Dk x BV, all of Dk) and walks the chunks, storing the state entering each --
and a parallel level whose grid is (chunk, batch * head, v tile), where every chunk's tokens are tl.dots
against its stored entering state. The chunk-start gradient makes the chunk-to-chunk map a full Dk x Dk
matrix (W <- W - k^T diag(P_e) 2 (k W - v) ...), like the delta rule's, so the first level cannot be a
parallel scan. The backward has the same two levels: the state cotangents, a linear map that never
reads the states, in reverse chunk order; then every per-token gradient in parallel. The columns of W
are independent under the l2 loss (delta's column j reads only W's column j), which lets the grid split
Dv. Tensors are laid out (B, H, Tp, D) with Tp the length padded to whole chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def _dot(a, b, IS_F32: tl.constexpr):
    """a @ b in float32 on the tensor cores' float32 paths: exact ("ieee") for float32 inputs; tf32 for
    half-precision inputs, whose own precision is below tf32's (operands here are often float32 states)."""
    if IS_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def _state_ptrs(bh, pid_v, Dk, Dv, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of this program's (BK, BV) tile of a (.., Dk, Dv) state, and the k / v lanes."""
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    kmask, vmask = kk < Dk, vv < Dv
    return kk[:, None] * Dv + vv[None, :], kmask[:, None] & vmask[None, :], kk, vv, kmask, vmask


@triton.jit
def _load_chunk(Q, K, V, bh, c, Tp, Dk, Dv, L, kk, vv, kmask, vmask, BL: tl.constexpr):
    """The chunk's q, k (BL, BK) and v (BL, BV) (rows past the chunk length L zero) and token lanes."""
    tt = tl.arange(0, BL)
    live = tt < L
    row = bh * Tp + c * L + tt
    q = tl.load(Q + row[:, None] * Dk + kk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
    k = tl.load(K + row[:, None] * Dk + kk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
    v = tl.load(V + row[:, None] * Dv + vv[None, :], mask=live[:, None] & vmask[None, :], other=0.0)
    return q, k, v.to(tl.float32), tt, live, row


@triton.jit
def _load_coeffs(CW, CS, C0, FP, P, LAST, PL, R, bh, b, c, Tp, L, NC, tt, live, HAS_DOCS: tl.constexpr):
    """The chunk's gate coefficients (triton_linear.py): per token cW, cS, c0, from_prev (BL,); P (BL, BL);
    the last token's row P_e and momentum row R (BL,); and the chunk-exit scalars cW_e, cS_e, c0_e, pe_e."""
    tok = bh * Tp + c * L + tt
    cw = tl.load(CW + tok, mask=live, other=0.0)
    cs = tl.load(CS + tok, mask=live, other=0.0)
    ch = bh * NC + c
    p = tl.load(P + ch * L * L + tt[:, None] * L + tt[None, :], mask=live[:, None] & live[None, :], other=0.0)
    pl = tl.load(PL + ch * L + tt, mask=live, other=0.0)
    r = tl.load(R + ch * L + tt, mask=live, other=0.0)
    lw = tl.load(LAST + ch * 4)
    ls = tl.load(LAST + ch * 4 + 1)
    l0 = tl.load(LAST + ch * 4 + 2)
    lpe = tl.load(LAST + ch * 4 + 3)
    if HAS_DOCS:
        c0 = tl.load(C0 + tok, mask=live, other=0.0)
        fp = tl.load(FP + b * Tp + c * L + tt, mask=live, other=1.0)
    else:
        c0 = tl.zeros_like(cw)
        fp = tl.full(cw.shape, 1.0, tl.float32)
    return cw, cs, c0, fp, p, pl, r, lw, ls, l0, lpe


@triton.jit
def _delta(k, v, W, M, fp, HAS_DOCS: tl.constexpr, IS_F32: tl.constexpr):
    """The tokens' loss gradients at their base weights (BL, BV): 2 (fp (k W) + (1 - fp) (k M0) - v)."""
    kw = _dot(k, W, IS_F32)
    if HAS_DOCS:
        return 2.0 * (fp[:, None] * kw + (1.0 - fp[:, None]) * _dot(k, M, IS_F32) - v)
    else:
        return 2.0 * (kw - v)


@triton.jit
def _fwd_states(K, V, W0, S0, M0, CW, CS, C0, FP, P, LAST, PL, R, WST, SST, WF, SF,
                H, Tp, Dk, Dv, L, NC,
                HAS_DOCS: tl.constexpr, IS_F32: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The sequential level, grid (v tile, B * H): WST, SST (B, H, NC, Dk, Dv) the state entering every
    chunk, WF, SF (B, H, Dk, Dv) the state after the last. Per chunk, with delta = `_delta`:
        W' = cW_e W + cS_e S + c0_e M0 - k^T (P_e delta),   S' = pe_e S - k^T (R delta)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    off, smask, kk, vv, kmask, vmask = _state_ptrs(bh, pid_v, Dk, Dv, BK, BV)
    W = tl.load(W0 + bh * Dk * Dv + off, mask=smask, other=0.0)
    S = tl.load(S0 + bh * Dk * Dv + off, mask=smask, other=0.0)
    M = W  # unread without documents
    if HAS_DOCS:
        M = tl.load(M0 + h * Dk * Dv + off, mask=smask, other=0.0)
    for c in range(NC):
        tl.store(WST + (bh * NC + c) * Dk * Dv + off, W, mask=smask)
        tl.store(SST + (bh * NC + c) * Dk * Dv + off, S, mask=smask)
        q, k, v, tt, live, row = _load_chunk(K, K, V, bh, c, Tp, Dk, Dv, L, kk, vv, kmask, vmask, BL)
        cw, cs, c0, fp, p, pl, r, lw, ls, l0, lpe = _load_coeffs(CW, CS, C0, FP, P, LAST, PL, R, bh, b, c, Tp, L,
                                                                  NC, tt, live, HAS_DOCS)
        delta = _delta(k, v, W, M, fp, HAS_DOCS, IS_F32)
        kt = tl.trans(k)
        W_new = lw * W + ls * S - _dot(kt, pl[:, None] * delta, IS_F32)
        if HAS_DOCS:
            W_new += l0 * M
        S = lpe * S - _dot(kt, r[:, None] * delta, IS_F32)
        W = W_new
    tl.store(WF + bh * Dk * Dv + off, W, mask=smask)
    tl.store(SF + bh * Dk * Dv + off, S, mask=smask)


@triton.jit
def _fwd_out(Q, K, V, M0, CW, CS, C0, FP, P, LAST, PL, R, WST, SST, Y,
             H, Tp, Dk, Dv, L, NC,
             HAS_DOCS: tl.constexpr, IS_F32: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The parallel level, grid (chunk, B * H, v tile): Y (B, H, Tp, Dv) float32, the chunk's readouts
    from its entering state: y = cW (q W) + cS (q S) + c0 (q M0) - (P * q k^T) delta."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    b, h = bh // H, bh % H
    off, smask, kk, vv, kmask, vmask = _state_ptrs(bh, pid_v, Dk, Dv, BK, BV)
    W = tl.load(WST + (bh * NC + c) * Dk * Dv + off, mask=smask, other=0.0)
    S = tl.load(SST + (bh * NC + c) * Dk * Dv + off, mask=smask, other=0.0)
    q, k, v, tt, live, row = _load_chunk(Q, K, V, bh, c, Tp, Dk, Dv, L, kk, vv, kmask, vmask, BL)
    cw, cs, c0, fp, p, pl, r, lw, ls, l0, lpe = _load_coeffs(CW, CS, C0, FP, P, LAST, PL, R, bh, b, c, Tp, L,
                                                              NC, tt, live, HAS_DOCS)
    M = W
    if HAS_DOCS:
        M = tl.load(M0 + h * Dk * Dv + off, mask=smask, other=0.0)
    delta = _delta(k, v, W, M, fp, HAS_DOCS, IS_F32)
    y = cw[:, None] * _dot(q, W, IS_F32) + cs[:, None] * _dot(q, S, IS_F32)
    if HAS_DOCS:
        y += c0[:, None] * _dot(q, M, IS_F32)
    y -= _dot(_dot(q, tl.trans(k), IS_F32) * p, delta, IS_F32)
    tl.store(Y + row[:, None] * Dv + vv[None, :], y, mask=live[:, None] & vmask[None, :])


@triton.jit
def _loss_cotangent(q, k, dy, dW, dS, p, pl, r, IS_F32: tl.constexpr):
    """E = 2 d(objective)/d(delta) (BL, BV) from the chunk's outputs' cotangent dy and its exit state's
    (dW, dS): -2 ((P * q k^T)^T dy + P_e (k dW) + R (k dS)); also q k^T (BL, BL), k dW and k dS (BL, BV)."""
    qk = _dot(q, tl.trans(k), IS_F32)
    kdW = _dot(k, dW, IS_F32)
    kdS = _dot(k, dS, IS_F32)
    E = -2.0 * (_dot(tl.trans(qk * p), dy, IS_F32) + pl[:, None] * kdW + r[:, None] * kdS)
    return E, qk, kdW, kdS


@triton.jit
def _bwd_states(Q, K, CW, CS, C0, FP, P, LAST, PL, R, DY, DWF, DSF, DWST, DSST, DW0, DS0, DM0,
                H, Tp, Dk, Dv, L, NC,
                HAS_DOCS: tl.constexpr, IS_F32: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The adjoint's sequential level, grid (v tile, B * H), chunks in reverse: DWST, DSST (B, H, NC, Dk, Dv)
    the cotangents of the state leaving every chunk, DW0, DS0 (B, H, Dk, Dv) the initial state's and with
    documents DM0 (B, H, Dk, Dv) M0's through the restarts. The map is linear: it never reads the states.
        dW = q^T (cW dy) + cW_e dW' + k^T (fp E),   dS = q^T (cS dy) + cS_e dW' + pe_e dS'
        dM0 += q^T (c0 dy) + c0_e dW' + k^T ((1 - fp) E)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    off, smask, kk, vv, kmask, vmask = _state_ptrs(bh, pid_v, Dk, Dv, BK, BV)
    dW = tl.load(DWF + bh * Dk * Dv + off, mask=smask, other=0.0)
    dS = tl.load(DSF + bh * Dk * Dv + off, mask=smask, other=0.0)
    dM = tl.zeros((BK, BV), dtype=tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        tl.store(DWST + (bh * NC + c) * Dk * Dv + off, dW, mask=smask)
        tl.store(DSST + (bh * NC + c) * Dk * Dv + off, dS, mask=smask)
        q, k, dy, tt, live, row = _load_chunk(Q, K, DY, bh, c, Tp, Dk, Dv, L, kk, vv, kmask, vmask, BL)
        cw, cs, c0, fp, p, pl, r, lw, ls, l0, lpe = _load_coeffs(CW, CS, C0, FP, P, LAST, PL, R, bh, b, c, Tp, L,
                                                                  NC, tt, live, HAS_DOCS)
        E, qk, kdW, kdS = _loss_cotangent(q, k, dy, dW, dS, p, pl, r, IS_F32)
        qt, kt = tl.trans(q), tl.trans(k)
        if HAS_DOCS:
            dM += _dot(qt, c0[:, None] * dy, IS_F32) + l0 * dW + _dot(kt, (1.0 - fp[:, None]) * E, IS_F32)
        dW_prev = _dot(qt, cw[:, None] * dy, IS_F32) + lw * dW + _dot(kt, fp[:, None] * E, IS_F32)
        dS = _dot(qt, cs[:, None] * dy, IS_F32) + ls * dW + lpe * dS
        dW = dW_prev
    tl.store(DW0 + bh * Dk * Dv + off, dW, mask=smask)
    tl.store(DS0 + bh * Dk * Dv + off, dS, mask=smask)
    if HAS_DOCS:
        tl.store(DM0 + bh * Dk * Dv + off, dM, mask=smask)


@triton.jit
def _bwd_chunk(Q, K, V, M0, CW, CS, C0, FP, P, LAST, PL, R, WST, SST, DY, DWST, DSST,
               DQ, DK, DV, DCW, DCS, DC0, DP, DLAST, DPL, DR,
               B, H, Tp, Dk, Dv, L, NC,
               HAS_DOCS: tl.constexpr, IS_F32: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The adjoint's parallel level, grid (chunk, B * H, v tile): every per-token gradient of the chunk from
    its entering state (WST, SST) and its exit state's cotangent (DWST, DSST). DV (B, H, Tp, Dv) is this
    tile's columns; the rest are sums over Dv, written as partials (leading dim: the v tile) that the caller
    sums: DQ, DK (NV, B, H, Tp, Dk), DCW, DCS, DC0 (NV, B, H, Tp), DP (NV, B, H, NC, L, L),
    DLAST (NV, B, H, NC, 4), DPL, DR (NV, B, H, NC, L)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    b, h = bh // H, bh % H
    part = pid_v * B * H + bh  # this tile's slice of the partial sums
    off, smask, kk, vv, kmask, vmask = _state_ptrs(bh, pid_v, Dk, Dv, BK, BV)
    W = tl.load(WST + (bh * NC + c) * Dk * Dv + off, mask=smask, other=0.0)
    S = tl.load(SST + (bh * NC + c) * Dk * Dv + off, mask=smask, other=0.0)
    dW = tl.load(DWST + (bh * NC + c) * Dk * Dv + off, mask=smask, other=0.0)
    dS = tl.load(DSST + (bh * NC + c) * Dk * Dv + off, mask=smask, other=0.0)
    q, k, v, tt, live, row = _load_chunk(Q, K, V, bh, c, Tp, Dk, Dv, L, kk, vv, kmask, vmask, BL)
    cw, cs, c0, fp, p, pl, r, lw, ls, l0, lpe = _load_coeffs(CW, CS, C0, FP, P, LAST, PL, R, bh, b, c, Tp, L,
                                                              NC, tt, live, HAS_DOCS)
    dy = tl.load(DY + row[:, None] * Dv + vv[None, :], mask=live[:, None] & vmask[None, :], other=0.0)
    M = W
    if HAS_DOCS:
        M = tl.load(M0 + h * Dk * Dv + off, mask=smask, other=0.0)
    delta = _delta(k, v, W, M, fp, HAS_DOCS, IS_F32)
    E, qk, kdW, kdS = _loss_cotangent(q, k, dy, dW, dS, p, pl, r, IS_F32)
    dA = -_dot(dy, tl.trans(delta), IS_F32)  # (BL, BL): the cotangent of P * q k^T
    pair = part * NC + c
    tl.store(DP + pair * L * L + tt[:, None] * L + tt[None, :], dA * qk, mask=live[:, None] & live[None, :])
    dqk = dA * p
    tok = part * Tp + c * L + tt
    tl.store(DCW + tok, tl.sum(dy * _dot(q, W, IS_F32), axis=1), mask=live)
    tl.store(DCS + tok, tl.sum(dy * _dot(q, S, IS_F32), axis=1), mask=live)
    tl.store(DPL + pair * L + tt, -tl.sum(kdW * delta, axis=1), mask=live)
    tl.store(DR + pair * L + tt, -tl.sum(kdS * delta, axis=1), mask=live)
    tl.store(DLAST + pair * 4, tl.sum(tl.sum(dW * W, axis=1), axis=0))
    tl.store(DLAST + pair * 4 + 1, tl.sum(tl.sum(dW * S, axis=1), axis=0))
    tl.store(DLAST + pair * 4 + 3, tl.sum(tl.sum(dS * S, axis=1), axis=0))
    dq = _dot(dqk, k, IS_F32) + _dot(cw[:, None] * dy, tl.trans(W), IS_F32) + _dot(cs[:, None] * dy, tl.trans(S),
                                                                                     IS_F32)
    dk = _dot(tl.trans(dqk), q, IS_F32) - _dot(pl[:, None] * delta, tl.trans(dW), IS_F32) \
        - _dot(r[:, None] * delta, tl.trans(dS), IS_F32) + _dot(fp[:, None] * E, tl.trans(W), IS_F32)
    if HAS_DOCS:
        tl.store(DC0 + tok, tl.sum(dy * _dot(q, M, IS_F32), axis=1), mask=live)
        tl.store(DLAST + pair * 4 + 2, tl.sum(tl.sum(dW * M, axis=1), axis=0))
        dq += _dot(c0[:, None] * dy, tl.trans(M), IS_F32)
        dk += _dot((1.0 - fp[:, None]) * E, tl.trans(M), IS_F32)
    else:
        tl.store(DLAST + pair * 4 + 2, 0.0)
    tok_k = tok[:, None] * Dk + kk[None, :]
    tl.store(DQ + tok_k, dq, mask=live[:, None] & kmask[None, :])
    tl.store(DK + tok_k, dk, mask=live[:, None] & kmask[None, :])
    tl.store(DV + row[:, None] * Dv + vv[None, :], -E, mask=live[:, None] & vmask[None, :])
