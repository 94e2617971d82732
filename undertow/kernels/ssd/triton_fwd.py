"""Triton forward kernels of SSD (see chunked.py for the three chunk terms they compute).

Layouts (all contiguous): x, dy, y (Bt, T, H, P); dt (Bt, T, H) float32; a (Bt, H, Tp) float32 with
Tp = nc * L; seg (Bt, Tp) int32; B, C (Bt, T, G, N); chunk states (Bt, nc, H, P, N) float32;
states (Bt, nc + 1, H, P, N) float32 = the state entering each chunk, then the final state.
Matrix products accumulate in float32. PREC (a constexpr) picks their operands: 0 for float32 inputs,
exact ("ieee", no tf32); for 16-bit inputs C.B runs on the inputs' type and every other product on
float32 operands in tf32 (1) or rounded to bfloat16 (2) / float16 (3), the tensor cores' fast path
(see `mm`; triton.py chooses, scripts/bench_ssd.py gpu --sweep times the choices).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b of derived operands (scores, dt*x, states, gradients), float32 accumulation. PREC 0: exact
    ("ieee", float32 inputs); 1: tf32, a 10-bit mantissa and float32's range; 2 / 3: operands rounded
    to bfloat16 / float16, twice tf32's tensor-core rate (bf16 rounding of the derived operands costs
    up to ~1e-2 in A's gradient)."""
    if PREC == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if PREC == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    if PREC == 3:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def mm_inputs(a, b, PREC: tl.constexpr):
    """a @ b of two raw inputs (C and B), which share one dtype: exact for float32, else native."""
    if PREC == 0:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def chunk_bounds(A, SEG, b, h, c, T, Tp, H, L: tl.constexpr):
    """Per chunk: index of its last real token, a at that token, the segment of that token and the
    segment of the token before the chunk (whose state the chunk carries in)."""
    end = tl.minimum(c * L + L, T) - 1
    a_end = tl.load(A + (b * H + h) * Tp + end)
    seg_end = tl.load(SEG + b * Tp + end)
    seg_ref = tl.load(SEG + b * Tp + tl.maximum(c * L - 1, 0))
    return end, a_end, seg_end, seg_ref


@triton.jit
def token_tile(A_ROW, SEG_ROW, c, start, T, L: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK tokens of chunk c from position `start` within it, as a scan kernel's inner loop reads
    them: their indices, which are real (< T and inside the chunk), and their a and segment numbers
    (A_ROW, SEG_ROW: the row's pointers; -2 past the ends, a segment no real token has)."""
    loc = start + tl.arange(0, BLOCK)
    idx = c * L + loc
    ok = (idx < T) & (loc < L)
    return idx, ok, tl.load(A_ROW + idx, mask=ok, other=0.0), tl.load(SEG_ROW + idx, mask=ok, other=-2)


@triton.jit
def chunk_outer_kernel(
    X, DT, A, SEG, K, OUT, T, Tp, H, G, P, N, nc,
    FROM_END: tl.constexpr, L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """OUT[b, c, h] = sum_t w_t X_t (outer) K_t over the tokens t of chunk c:
    FROM_END: w_t = dt_t exp(a_end - a_t) [t in the chunk's last segment]  (chunk state, X = x, K = B);
    else:     w_t = exp(a_t) [t in the carried segment]                      (dS_in from dy, X = dy, K = C).
    Grid (nc, Bt * H, cdiv(P, BLOCK_P))."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    g = h // (H // G)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    _, a_end, seg_end, seg_ref = chunk_bounds(A, SEG, b, h, c, T, Tp, H, L)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, L, BLOCK_L):
        t = c * L + t0 + tl.arange(0, BLOCK_L)
        valid = (t < T) & (t0 + tl.arange(0, BLOCK_L) < L)
        a_t = tl.load(A + (b * H + h) * Tp + t, mask=valid, other=0.0)
        seg_t = tl.load(SEG + b * Tp + t, mask=valid, other=-1)
        if FROM_END:
            dt_t = tl.load(DT + (b * T + t) * H + h, mask=valid, other=0.0)
            w = tl.where(valid & (seg_t == seg_end), tl.exp(tl.where(valid, a_end - a_t, 0.0)) * dt_t, 0.0)
        else:
            w = tl.where(valid & (seg_t == seg_ref), tl.exp(a_t), 0.0)
        xt = tl.load(X + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                     mask=valid[:, None] & (p[None, :] < P), other=0.0).to(tl.float32)
        kt = tl.load(K + ((b * T + t[:, None]) * G + g) * N + n[None, :],
                     mask=valid[:, None] & (n[None, :] < N), other=0.0)
        acc += mm(tl.trans(xt * w[:, None]), kt, PREC)
    out = OUT + ((b * nc + c) * H + h) * P * N
    tl.store(out + p[:, None] * N + n[None, :], acc, mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def state_pass_fwd_kernel(
    CHUNK_STATES, INIT, A, SEG, STATES, T, Tp, H, PN, nc,
    HAS_INIT: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr,
):
    """STATES[b, 0] = initial state; STATES[b, c + 1] = g_c STATES[b, c] + CHUNK_STATES[b, c], with
    g_c = exp(a_end) when chunk c holds no document start, else 0. Grid (Bt * H, cdiv(P * N, BLOCK))."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < PN
    if HAS_INIT:
        S = tl.load(INIT + bh * PN + i, mask=ok, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(nc):
        tl.store(STATES + ((b * (nc + 1) + c) * H + h) * PN + i, S, mask=ok)
        _, a_end, seg_end, seg_ref = chunk_bounds(A, SEG, b, h, c, T, Tp, H, L)
        carry = tl.where(seg_end == seg_ref, tl.exp(a_end), 0.0)
        S = carry * S + tl.load(CHUNK_STATES + ((b * nc + c) * H + h) * PN + i, mask=ok, other=0.0)
    tl.store(STATES + ((b * (nc + 1) + nc) * H + h) * PN + i, S, mask=ok)


@triton.jit
def chunk_scan_fwd_kernel(
    X, DT, A, SEG, B, C, STATES, D, Y, T, Tp, H, G, P, N, nc,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr,
):
    """Y[t] = exp(a_t)[t in the carried segment] S_in @ C_t + sum_{s<=t, same segment} (C_t.B_s)
    exp(a_t - a_s) dt_s x_s (+ D x_t), for BLOCK_M tokens t of one chunk, stored in Y's dtype.
    D: (H,) or (H, P) (D_PER_P) float32. Grid (nc * cdiv(L, BLOCK_M), Bt * H, cdiv(P, BLOCK_P))."""
    n_mb = tl.cdiv(L, BLOCK_M)
    c, mb = tl.program_id(0) // n_mb, tl.program_id(0) % n_mb
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    g = h // (H // G)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    _, _, _, seg_ref = chunk_bounds(A, SEG, b, h, c, T, Tp, H, L)
    t = c * L + mb * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = (t < T) & (mb * BLOCK_M + tl.arange(0, BLOCK_M) < L)
    a_t = tl.load(A + (b * H + h) * Tp + t, mask=t_ok, other=0.0)
    seg_t = tl.load(SEG + b * Tp + t, mask=t_ok, other=-1)
    c_t = tl.load(C + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=t_ok[:, None] & (n[None, :] < N), other=0.0)

    s_in = tl.load(STATES + ((b * (nc + 1) + c) * H + h) * P * N + p[None, :] * N + n[:, None],
                   mask=(p[None, :] < P) & (n[:, None] < N), other=0.0)  # (BLOCK_N, BLOCK_P)
    head = tl.where(t_ok & (seg_t == seg_ref), tl.exp(a_t), 0.0)
    acc = mm(c_t, s_in, PREC) * head[:, None]

    for s0 in range(0, (mb + 1) * BLOCK_M, BLOCK_K):
        s, s_ok, a_s, seg_s = token_tile(A + (b * H + h) * Tp, SEG + b * Tp, c, s0, T, L, BLOCK_K)
        b_s = tl.load(B + ((b * T + s[:, None]) * G + g) * N + n[None, :], mask=s_ok[:, None] & (n[None, :] < N), other=0.0)
        dt_s = tl.load(DT + (b * T + s) * H + h, mask=s_ok, other=0.0)
        x_s = tl.load(X + ((b * T + s[:, None]) * H + h) * P + p[None, :], mask=s_ok[:, None] & (p[None, :] < P), other=0.0)
        same = (s[None, :] <= t[:, None]) & (seg_s[None, :] == seg_t[:, None]) & s_ok[None, :] & t_ok[:, None]
        decay = tl.exp(tl.where(same, a_t[:, None] - a_s[None, :], float("-inf")))
        scores = mm_inputs(c_t, tl.trans(b_s), PREC) * decay
        acc += mm(scores, x_s.to(tl.float32) * dt_s[:, None], PREC)
    y_ptr = ((b * T + t[:, None]) * H + h) * P + p[None, :]
    y_ok = t_ok[:, None] & (p[None, :] < P)
    if HAS_D:  # the skip connection, fused: y is written once, in its final dtype
        if D_PER_P:
            d = tl.load(D + h * P + p, mask=p < P, other=0.0)[None, :]
        else:
            d = tl.load(D + h)
        acc += d * tl.load(X + y_ptr, mask=y_ok, other=0.0).to(tl.float32)
    tl.store(Y + y_ptr, acc.to(Y.dtype.element_ty), mask=y_ok)


@triton.jit
def dt_step(DT, DT_BIAS, b, t, h, ok, T, H, lo, hi,
            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """reference.ssd_dt on a (tokens, heads) tile: returns (pre, sp, step) with pre = dt + bias,
    sp = softplus(pre) (torch's: pre itself above 20) or pre, step = sp clamped to [lo, hi]."""
    pre = tl.load(DT + (b * T + t[:, None]) * H + h[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += tl.load(DT_BIAS + h, mask=h < H, other=0.0).to(tl.float32)[None, :]
    sp = pre
    if SOFTPLUS:  # max(v, 0) + log1p(exp(-|v|)), log1p by its series where 1 + e would round
        e = tl.exp(-tl.abs(pre))
        sp = tl.where(pre > 20.0, pre, tl.maximum(pre, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e)))
    step = sp
    if HAS_LIMIT:
        step = tl.minimum(tl.maximum(sp, lo), hi)
    return pre, sp, step


@triton.jit
def dt_prep_kernel(
    DT, DT_BIAS, A, STEP, ACUM, T, Tp, H, nc, lo, hi,
    L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
):
    """The scan's elementwise prologue in one pass: STEP (Bt, T, H) float32 = reference.ssd_dt(dt) and
    ACUM (Bt, H, Tp) = chunked.chunk_decays(...)[0]: the inclusive cumsum of step * A restarted at every chunk
    (past T the last value repeats). Grid (Bt * nc, cdiv(H, BLOCK_H))."""
    pid = tl.program_id(0).to(tl.int64)
    b, c = pid // nc, pid % nc
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    l = tl.arange(0, BLOCK_L)
    t = c * L + l
    in_chunk = (l < L)[:, None] & (h < H)[None, :]
    ok = in_chunk & (t < T)[:, None]
    _, _, step = dt_step(DT, DT_BIAS, b, t, h, ok, T, H, lo, hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    step = tl.where(ok, step, 0.0)
    tl.store(STEP + (b * T + t[:, None]) * H + h[None, :], step, mask=ok)
    a_h = tl.load(A + h, mask=h < H, other=0.0).to(tl.float32)
    tl.store(ACUM + (b * H + h[None, :]) * Tp + t[:, None], tl.cumsum(step * a_h[None, :], axis=0), mask=in_chunk)
