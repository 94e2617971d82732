"""Triton backward kernels of SSD. Layouts as in triton_fwd.py; every gradient is float32.

With E_c = dL/dS_in[c+1] (the gradient of chunk c's outgoing state) and dy the output gradient,
each token i of a chunk collects its gradients in two roles:
  target  (i reads the carried state and the tokens s <= i): dC_i and part of da_i;
  source  (i is read by E_c and the tokens t >= i):          du_i -> dx_i, ddt_i, dB_i, rest of da_i.
The gradient of a at each chunk's last token from its outgoing state, sum(E_c * S_out[c]), comes
from the reverse state pass (its factors exp(a_end - a_s) and g_c all scale with exp(a_end)).
"""

from __future__ import annotations

import triton
import triton.language as tl

from undertow.kernels.ssd.triton_fwd import chunk_bounds, dt_step, mm, mm_inputs, token_tile

STATE_SLICE = tl.constexpr(32)  # state columns a step when a kernel contracts a float32 (P, N) tile in slices


@triton.jit
def raw_mm(a, b, PREC: tl.constexpr, SAME_DTYPE: tl.constexpr):
    """a @ b of x and dy as stored (dt, a per-token factor, is applied to the product, not to x): in
    their own 16-bit dtype (the tensor cores' full rate, nothing rounded) when dy has x's dtype
    (SAME_DTYPE), else as `mm` (dy is float32 when z gates y outside the kernel)."""
    if SAME_DTYPE:
        return mm_inputs(a, b, PREC)
    return mm(a, b, PREC)


@triton.jit
def state_pass_bwd_kernel(
    DS, DFINAL, A, SEG, STATES, DEND, DINIT, T, Tp, H, PN, nc,
    L: tl.constexpr, BLOCK: tl.constexpr, CARRY_ONLY: tl.constexpr,
):
    """Reverse state pass. DS holds on entry sum_t exp(a_t)[carried] dy_t (outer) C_t per chunk (the
    gradient of S_in[c] from chunk c's own outputs) and on exit E_c. DEND[bh, c, block] gets the
    partial sums of E_c * S_out[c], or with CARRY_ONLY of E_c * g_c S_in[c] (the carried part of S_out:
    the split backward takes the chunk-state part per token, see scan_bwd_dx_kernel); DINIT the
    gradient of the initial state. Grid (Bt * H, cdiv(P*N, BLOCK))."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    blk = tl.program_id(1)
    i = blk * BLOCK + tl.arange(0, BLOCK)
    ok = i < PN
    E = tl.load(DFINAL + bh * PN + i, mask=ok, other=0.0).to(tl.float32)
    for k in range(nc):
        c = nc - 1 - k
        ds_ptr = DS + ((b * nc + c) * H + h) * PN + i
        own = tl.load(ds_ptr, mask=ok, other=0.0)
        tl.store(ds_ptr, E, mask=ok)
        _, a_end, seg_end, seg_ref = chunk_bounds(A, SEG, b, h, c, T, Tp, H, L)
        carry = tl.where(seg_end == seg_ref, tl.exp(a_end), 0.0)
        if CARRY_ONLY:
            s_in = tl.load(STATES + ((b * (nc + 1) + c) * H + h) * PN + i, mask=ok, other=0.0)
            tl.store(DEND + (bh * nc + c) * tl.num_programs(1) + blk, carry * tl.sum(E * s_in, axis=0))
        else:
            s_out = tl.load(STATES + ((b * (nc + 1) + c + 1) * H + h) * PN + i, mask=ok, other=0.0)
            tl.store(DEND + (bh * nc + c) * tl.num_programs(1) + blk, tl.sum(E * s_out, axis=0))
        E = carry * E + own
    tl.store(DINIT + bh * PN + i, E, mask=ok)


@triton.jit
def chunk_scan_bwd_target_kernel(
    DY, X, DT, A, SEG, B, C, STATES, DC, DA, T, Tp, H, G, P, N, nc, HP,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, DY_RAW: tl.constexpr,
):
    """Tokens t as readers: DC[t] and DA[t] from the carried state and from the tokens s <= t of the
    same segment. One program takes HP heads of one group (HP divides H // G) and sums their dC in
    registers: DC is (Bt, T, H // HP, N), one partial per block of heads (summed in PyTorch when
    H // HP > G). Grid (nc * cdiv(L, BLOCK_M), Bt * (H // HP))."""
    n_mb = tl.cdiv(L, BLOCK_M)
    c, mb = tl.program_id(0) // n_mb, tl.program_id(0) % n_mb
    HB = H // HP
    bhb = tl.program_id(1).to(tl.int64)
    b, hb = bhb // HB, bhb % HB
    g = (hb * HP) // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    seg_ref = tl.load(SEG + b * Tp + tl.maximum(c * L - 1, 0))
    t = c * L + mb * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = (t < T) & (mb * BLOCK_M + tl.arange(0, BLOCK_M) < L)
    seg_t = tl.load(SEG + b * Tp + t, mask=t_ok, other=-1)
    c_t = tl.load(C + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=t_ok[:, None] & (n[None, :] < N), other=0.0)
    dc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for hh in range(HP):
        h = hb * HP + hh
        a_t = tl.load(A + (b * H + h) * Tp + t, mask=t_ok, other=0.0)
        dy_t = tl.load(DY + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=t_ok[:, None] & (p[None, :] < P),
                       other=0.0)
        s_in = tl.load(STATES + ((b * (nc + 1) + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                       mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_N)
        head = tl.where(t_ok & (seg_t == seg_ref), tl.exp(a_t), 0.0)
        dc_head = mm(dy_t * head[:, None], s_in, PREC)
        # head_t dy_t . (S_in C_t) = C_t . (head_t dy_t S_in): from dc_head, no second product with S_in
        da = tl.sum(c_t.to(tl.float32) * dc_head, axis=1)
        dc += dc_head

        for s0 in range(0, (mb + 1) * BLOCK_M, BLOCK_K):
            s, s_ok, a_s, seg_s = token_tile(A + (b * H + h) * Tp, SEG + b * Tp, c, s0, T, L, BLOCK_K)
            b_s = tl.load(B + ((b * T + s[:, None]) * G + g) * N + n[None, :], mask=s_ok[:, None] & (n[None, :] < N),
                          other=0.0)
            dt_s = tl.load(DT + (b * T + s) * H + h, mask=s_ok, other=0.0)
            x_s = tl.load(X + ((b * T + s[:, None]) * H + h) * P + p[None, :], mask=s_ok[:, None] & (p[None, :] < P),
                          other=0.0)
            same = (s[None, :] <= t[:, None]) & (seg_s[None, :] == seg_t[:, None]) & s_ok[None, :] & t_ok[:, None]
            decay = tl.exp(tl.where(same, a_t[:, None] - a_s[None, :], float("-inf")))
            d_scores = raw_mm(dy_t, tl.trans(x_s), PREC, DY_RAW) * (dt_s[None, :] * decay)  # dy . (dt x)^T
            dc += mm(d_scores, b_s, PREC)
            da += tl.sum(d_scores * mm_inputs(c_t, tl.trans(b_s), PREC), axis=1)
        tl.store(DA + (b * H + h) * Tp + t, da, mask=t_ok)
    tl.store(DC + ((b * T + t[:, None]) * HB + hb) * N + n[None, :], dc, mask=t_ok[:, None] & (n[None, :] < N))


@triton.jit
def chunk_scan_bwd_source_kernel(
    DY, X, DT, A, SEG, B, C, DS, D, DX, DDT, DB, DA, DD, T, Tp, H, G, P, N, nc, HP,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr,
    DY_RAW: tl.constexpr,
):
    """Tokens s as sources: DX (in its dtype, with the skip's D dy), DDT, DB and the rest of DA (added
    to what the target kernel stored) from the outgoing-state gradient E_c (in DS) and from the tokens
    t >= s of the same segment; DD[b * H + h, program, p] = sum_s dy_s x_s over this program's tokens
    (D's gradient, summed in PyTorch). One program takes HP heads of one group and sums their dB in
    registers: DB is (Bt, T, H // HP, N). Grid (nc * cdiv(L, BLOCK_M), Bt * (H // HP))."""
    n_mb = tl.cdiv(L, BLOCK_M)
    c, mb = tl.program_id(0) // n_mb, tl.program_id(0) % n_mb
    HB = H // HP
    bhb = tl.program_id(1).to(tl.int64)
    b, hb = bhb // HB, bhb % HB
    g = (hb * HP) // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    end = tl.minimum(c * L + L, T) - 1
    seg_end = tl.load(SEG + b * Tp + end)
    s = c * L + mb * BLOCK_M + tl.arange(0, BLOCK_M)
    s_ok = (s < T) & (mb * BLOCK_M + tl.arange(0, BLOCK_M) < L)
    seg_s = tl.load(SEG + b * Tp + s, mask=s_ok, other=-1)
    b_s = tl.load(B + ((b * T + s[:, None]) * G + g) * N + n[None, :], mask=s_ok[:, None] & (n[None, :] < N), other=0.0)
    x_row = (b * T + s[:, None]) * H  # x[b, s, h, p] at (x_row + h) * P + p
    x_ok = s_ok[:, None] & (p[None, :] < P)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for hh in range(HP):
        h = hb * HP + hh
        bh = b * H + h
        a_end = tl.load(A + bh * Tp + end)
        a_s = tl.load(A + bh * Tp + s, mask=s_ok, other=0.0)
        dt_s = tl.load(DT + (b * T + s) * H + h, mask=s_ok, other=0.0)
        x_in = tl.load(X + (x_row + h) * P + p[None, :], mask=x_ok, other=0.0)
        x_s = x_in.to(tl.float32)
        u_s = x_s * dt_s[:, None]

        e = tl.load(DS + ((b * nc + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                    mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_N)
        tail = tl.where(s_ok & (seg_s == seg_end), tl.exp(tl.where(s_ok, a_end - a_s, 0.0)), 0.0)
        eb = mm(b_s, tl.trans(e), PREC)  # (BLOCK_M, BLOCK_P)
        du = eb * tail[:, None]
        db += mm(u_s * tail[:, None], e, PREC)
        da = -tl.sum(u_s * du, axis=1)

        for t0 in range(mb * BLOCK_M, L, BLOCK_K):
            t, t_ok, a_t, seg_t = token_tile(A + bh * Tp, SEG + b * Tp, c, t0, T, L, BLOCK_K)
            c_t = tl.load(C + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=t_ok[:, None] & (n[None, :] < N),
                          other=0.0)
            dy_t = tl.load(DY + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=t_ok[:, None] & (p[None, :] < P),
                           other=0.0)
            same = (t[None, :] >= s[:, None]) & (seg_t[None, :] == seg_s[:, None]) & t_ok[None, :] & s_ok[:, None]
            decay = tl.exp(tl.where(same, a_t[None, :] - a_s[:, None], float("-inf")))  # (BLOCK_M, BLOCK_K)
            cb = mm_inputs(b_s, tl.trans(c_t), PREC)
            du += mm(cb * decay, dy_t, PREC)
            d_scores = raw_mm(x_in, tl.trans(dy_t), PREC, DY_RAW) * (dt_s[:, None] * decay)  # (dt x) . dy^T
            db += mm(d_scores, c_t, PREC)
            da -= tl.sum(d_scores * cb, axis=1)
        dx = du * dt_s[:, None]
        if HAS_D:
            dy_s = tl.load(DY + (x_row + h) * P + p[None, :], mask=x_ok, other=0.0).to(tl.float32)
            if D_PER_P:
                dx += tl.load(D + h * P + p, mask=p < P, other=0.0)[None, :] * dy_s
            else:
                dx += tl.load(D + h) * dy_s
            dd_ptr = DD + (bh * tl.num_programs(0) + tl.program_id(0)) * P + p
            tl.store(dd_ptr, tl.sum(dy_s * x_s, axis=0), mask=p < P)
        tl.store(DX + (x_row + h) * P + p[None, :], dx.to(DX.dtype.element_ty), mask=x_ok)
        tl.store(DDT + (b * T + s) * H + h, tl.sum(du * x_s, axis=1), mask=s_ok)
        da_ptr = DA + bh * Tp + s
        tl.store(da_ptr, tl.load(da_ptr, mask=s_ok, other=0.0) + da, mask=s_ok)
    tl.store(DB + ((b * T + s[:, None]) * HB + hb) * N + n[None, :], db, mask=s_ok[:, None] & (n[None, :] < N))


# The split backward (default, UNDERTOW_SSD_BWD=split): three scan kernels, each holding one big
# accumulator, where the two fused ones above hold two or three and spill at the 255-register cap.
# Two identities remove the dA sums over score tiles: with M[t, s] = (dy_t . dt_s x_s) exp(a_t - a_s) C_t.B_s
# (same segment, s <= t), the readers' part of da_t is sum_s M[t, s] + head_t dy_t . (S_in C_t) = C_t . dC_t
# (per head), and the sources' part of da_s is -sum_t M[t, s] - (outgoing-state term) = -u_s . du_s.
# Both leave out the diagonal M[t, t] (decay 1, the largest terms): it enters dA once with each sign,
# and summed in float32 from two kernels its residue swamped A's gradient under strong decays (4.7e-2
# at A x 40); the diagonal goes into dC and du after dA's terms are taken, exact in float32.


@triton.jit
def scan_bwd_dc_kernel(
    DY, X, DT, A, SEG, B, C, STATES, DC, DA, T, Tp, H, G, P, N, nc, HP,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, DY_RAW: tl.constexpr,
):
    """Tokens t as readers: DC[t] (summed over the HP heads of one group a program, partials
    (Bt, T, H // HP, N)) and DA[t] = C_t . dC_t of each head (stored: the first of the two DA terms).
    The loop over s tiles holds one (BLOCK_M, BLOCK_N) accumulator. Grid (nc * cdiv(L, BLOCK_M), Bt * (H // HP))."""
    n_mb = tl.cdiv(L, BLOCK_M)
    c, mb = tl.program_id(0) // n_mb, tl.program_id(0) % n_mb
    HB = H // HP
    bhb = tl.program_id(1).to(tl.int64)
    b, hb = bhb // HB, bhb % HB
    g = (hb * HP) // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    seg_ref = tl.load(SEG + b * Tp + tl.maximum(c * L - 1, 0))
    t = c * L + mb * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = (t < T) & (mb * BLOCK_M + tl.arange(0, BLOCK_M) < L)
    seg_t = tl.load(SEG + b * Tp + t, mask=t_ok, other=-1)
    c_ptr = C + ((b * T + t[:, None]) * G + g) * N + n[None, :]
    c_ok = t_ok[:, None] & (n[None, :] < N)
    dc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for hh in range(HP):
        h = hb * HP + hh
        a_t = tl.load(A + (b * H + h) * Tp + t, mask=t_ok, other=0.0)
        dy_t = tl.load(DY + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=t_ok[:, None] & (p[None, :] < P),
                       other=0.0)
        s_in = tl.load(STATES + ((b * (nc + 1) + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                       mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_N)
        head = tl.where(t_ok & (seg_t == seg_ref), tl.exp(a_t), 0.0)
        dc_h = mm(dy_t * head[:, None], s_in, PREC)
        # the diagonal s = t, dy_t . dt_t x_t (times B_t below), exact in float32; the loop takes s < t
        x_t = tl.load(X + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=t_ok[:, None] & (p[None, :] < P),
                      other=0.0).to(tl.float32)
        diag = tl.sum(dy_t.to(tl.float32) * x_t, axis=1) * tl.load(DT + (b * T + t) * H + h, mask=t_ok, other=0.0)
        for s0 in range(0, (mb + 1) * BLOCK_M, BLOCK_K):
            s, s_ok, a_s, seg_s = token_tile(A + (b * H + h) * Tp, SEG + b * Tp, c, s0, T, L, BLOCK_K)
            dt_s = tl.load(DT + (b * T + s) * H + h, mask=s_ok, other=0.0)
            x_s = tl.load(X + ((b * T + s[:, None]) * H + h) * P + p[None, :], mask=s_ok[:, None] & (p[None, :] < P),
                          other=0.0)
            same = (s[None, :] < t[:, None]) & (seg_s[None, :] == seg_t[:, None]) & s_ok[None, :] & t_ok[:, None]
            decay = tl.exp(tl.where(same, a_t[:, None] - a_s[None, :], float("-inf")))
            d_scores = raw_mm(dy_t, tl.trans(x_s), PREC, DY_RAW) * (dt_s[None, :] * decay)  # dy . (dt x)^T
            b_s = tl.load(B + ((b * T + s[:, None]) * G + g) * N + n[None, :], mask=s_ok[:, None] & (n[None, :] < N),
                          other=0.0)
            dc_h += mm(d_scores, b_s, PREC)
        c_t = tl.load(c_ptr, mask=c_ok, other=0.0).to(tl.float32)  # read here: not live across the loop
        tl.store(DA + (b * H + h) * Tp + t, tl.sum(c_t * dc_h, axis=1), mask=t_ok)
        b_t = tl.load(B + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=c_ok, other=0.0).to(tl.float32)
        dc += dc_h + diag[:, None] * b_t  # the diagonal after dA's term: its +/- pair in dA cancels exactly
    tl.store(DC + ((b * T + t[:, None]) * HB + hb) * N + n[None, :], dc, mask=c_ok)


@triton.jit
def scan_bwd_dx_kernel(
    DY, X, DT, A, SEG, B, C, DS, D, DX, DDT, DA, DW, DD, T, Tp, H, G, P, N, nc,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr,
):
    """Tokens s as sources, per head: du_s = tail_s E_c B_s + sum_{t >= s, same segment}
    exp(a_t - a_s) (B_s.C_t) dy_t, then DX = du dt (+ D dy, in x's dtype), DDT = du . x, DA -= u . du
    of the tokens t > s (added to the dC kernel's term), DW = u . du of the outgoing-state term (its
    gradient of a is a prefix sum of DW, taken by dt_prep_bwd_kernel) and DD[b * H + h, program, p] =
    sum_s dy_s x_s. One (BLOCK_M, BLOCK_P) accumulator. Grid (nc * cdiv(L, BLOCK_M), Bt * H)."""
    n_mb = tl.cdiv(L, BLOCK_M)
    c, mb = tl.program_id(0) // n_mb, tl.program_id(0) % n_mb
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    g = h // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    end = tl.minimum(c * L + L, T) - 1
    seg_end = tl.load(SEG + b * Tp + end)
    a_end = tl.load(A + bh * Tp + end)
    s = c * L + mb * BLOCK_M + tl.arange(0, BLOCK_M)
    s_ok = (s < T) & (mb * BLOCK_M + tl.arange(0, BLOCK_M) < L)
    seg_s = tl.load(SEG + b * Tp + s, mask=s_ok, other=-1)
    a_s = tl.load(A + bh * Tp + s, mask=s_ok, other=0.0)
    b_s = tl.load(B + ((b * T + s[:, None]) * G + g) * N + n[None, :], mask=s_ok[:, None] & (n[None, :] < N), other=0.0)
    # the diagonal t = s, B_s . C_s (times dy_s below), exact in float32; the loop takes t > s
    c_s = tl.load(C + ((b * T + s[:, None]) * G + g) * N + n[None, :], mask=s_ok[:, None] & (n[None, :] < N), other=0.0)
    cb_diag = tl.sum(b_s.to(tl.float32) * c_s.to(tl.float32), axis=1)
    du = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for t0 in range(mb * BLOCK_M, L, BLOCK_K):
        t, t_ok, a_t, seg_t = token_tile(A + bh * Tp, SEG + b * Tp, c, t0, T, L, BLOCK_K)
        c_t = tl.load(C + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=t_ok[:, None] & (n[None, :] < N),
                      other=0.0)
        same = (t[None, :] > s[:, None]) & (seg_t[None, :] == seg_s[:, None]) & t_ok[None, :] & s_ok[:, None]
        decay = tl.exp(tl.where(same, a_t[None, :] - a_s[:, None], float("-inf")))  # (BLOCK_M, BLOCK_K)
        dy_t = tl.load(DY + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=t_ok[:, None] & (p[None, :] < P),
                       other=0.0)
        du += mm(mm_inputs(b_s, tl.trans(c_t), PREC) * decay, dy_t, PREC)
    x_ptr = ((b * T + s[:, None]) * H + h) * P + p[None, :]
    x_ok = s_ok[:, None] & (p[None, :] < P)
    x_s = tl.load(X + x_ptr, mask=x_ok, other=0.0).to(tl.float32)
    dt_s = tl.load(DT + (b * T + s) * H + h, mask=s_ok, other=0.0)
    # dA's source term of the tokens t > s (the diagonal's +/- pair with the dC kernel's cancels exactly)
    da_ptr = DA + bh * Tp + s
    tl.store(da_ptr, tl.load(da_ptr, mask=s_ok, other=0.0) - dt_s * tl.sum(du * x_s, axis=1), mask=s_ok)
    # the outgoing-state term: its dA part goes to DW (a prefix sum, not the difference of two totals)
    # E B_s over slices of the state (E a float32 (P, N) tile would not fit beside the others)
    du_tail = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, BLOCK_N, STATE_SLICE):
        ns = n0 + tl.arange(0, STATE_SLICE)
        e = tl.load(DS + ((b * nc + c) * H + h) * P * N + p[:, None] * N + ns[None, :],
                    mask=(p[:, None] < P) & (ns[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_NS)
        b_n = tl.load(B + ((b * T + s[:, None]) * G + g) * N + ns[None, :], mask=s_ok[:, None] & (ns[None, :] < N),
                      other=0.0)
        du_tail += mm(b_n, tl.trans(e), PREC)
    tail = tl.where(s_ok & (seg_s == seg_end), tl.exp(tl.where(s_ok, a_end - a_s, 0.0)), 0.0)
    du_tail = du_tail * tail[:, None]  # (BLOCK_M, BLOCK_P)
    tl.store(DW + bh * Tp + s, dt_s * tl.sum(du_tail * x_s, axis=1), mask=s_ok)
    dy_s = tl.load(DY + x_ptr, mask=x_ok, other=0.0).to(tl.float32)
    du += du_tail + cb_diag[:, None] * dy_s
    dx = du * dt_s[:, None]
    if HAS_D:
        if D_PER_P:
            dx += tl.load(D + h * P + p, mask=p < P, other=0.0)[None, :] * dy_s
        else:
            dx += tl.load(D + h) * dy_s
        tl.store(DD + (bh * tl.num_programs(0) + tl.program_id(0)) * P + p, tl.sum(dy_s * x_s, axis=0), mask=p < P)
    tl.store(DX + x_ptr, dx.to(DX.dtype.element_ty), mask=x_ok)
    tl.store(DDT + (b * T + s) * H + h, tl.sum(du * x_s, axis=1), mask=s_ok)


@triton.jit
def scan_bwd_db_kernel(
    DY, X, DT, A, SEG, C, DS, DB, T, Tp, H, G, P, N, nc, HP,
    L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, DY_RAW: tl.constexpr,
):
    """Tokens s as sources: DB[s] = sum over the HP heads of one group of tail_s u_s E_c + sum_{t >= s,
    same segment} (dt_s x_s . dy_t) exp(a_t - a_s) C_t; partials (Bt, T, H // HP, N). One (BLOCK_M,
    BLOCK_N) accumulator. Grid (nc * cdiv(L, BLOCK_M), Bt * (H // HP))."""
    n_mb = tl.cdiv(L, BLOCK_M)
    c, mb = tl.program_id(0) // n_mb, tl.program_id(0) % n_mb
    HB = H // HP
    bhb = tl.program_id(1).to(tl.int64)
    b, hb = bhb // HB, bhb % HB
    g = (hb * HP) // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    end = tl.minimum(c * L + L, T) - 1
    seg_end = tl.load(SEG + b * Tp + end)
    s = c * L + mb * BLOCK_M + tl.arange(0, BLOCK_M)
    s_ok = (s < T) & (mb * BLOCK_M + tl.arange(0, BLOCK_M) < L)
    seg_s = tl.load(SEG + b * Tp + s, mask=s_ok, other=-1)
    x_ok = s_ok[:, None] & (p[None, :] < P)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for hh in range(HP):
        h = hb * HP + hh
        bh = b * H + h
        a_end = tl.load(A + bh * Tp + end)
        a_s = tl.load(A + bh * Tp + s, mask=s_ok, other=0.0)
        dt_s = tl.load(DT + (b * T + s) * H + h, mask=s_ok, other=0.0)
        x_in = tl.load(X + ((b * T + s[:, None]) * H + h) * P + p[None, :], mask=x_ok, other=0.0)
        e = tl.load(DS + ((b * nc + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                    mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_N)
        tail = tl.where(s_ok & (seg_s == seg_end), tl.exp(tl.where(s_ok, a_end - a_s, 0.0)), 0.0)
        db += mm(x_in.to(tl.float32) * (dt_s * tail)[:, None], e, PREC)
        for t0 in range(mb * BLOCK_M, L, BLOCK_K):
            t, t_ok, a_t, seg_t = token_tile(A + bh * Tp, SEG + b * Tp, c, t0, T, L, BLOCK_K)
            dy_t = tl.load(DY + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=t_ok[:, None] & (p[None, :] < P),
                           other=0.0)
            same = (t[None, :] >= s[:, None]) & (seg_t[None, :] == seg_s[:, None]) & t_ok[None, :] & s_ok[:, None]
            decay = tl.exp(tl.where(same, a_t[None, :] - a_s[:, None], float("-inf")))  # (BLOCK_M, BLOCK_K)
            d_scores = raw_mm(x_in, tl.trans(dy_t), PREC, DY_RAW) * (dt_s[:, None] * decay)  # (dt x) . dy^T
            c_t = tl.load(C + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=t_ok[:, None] & (n[None, :] < N),
                          other=0.0)
            db += mm(d_scores, c_t, PREC)
    tl.store(DB + ((b * T + s[:, None]) * HB + hb) * N + n[None, :], db, mask=s_ok[:, None] & (n[None, :] < N))


@triton.jit
def dt_prep_bwd_kernel(
    DT, DT_BIAS, A, DSTEP, DACUM, DEND, DW, DDT, DA_PART, DBIAS_PART, T, Tp, H, nc, NB, lo, hi,
    L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NB: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_W: tl.constexpr,
):
    """Backward of triton_fwd.dt_prep_kernel. DACUM (Bt, H, Tp): the scan kernels' gradient of the
    chunk cumsums a, to which the outgoing-state term sum_blocks DEND[b * H + h, c, :] is added at each
    chunk's last real token; g = its reverse cumsum within the chunk is the gradient of step * A.
    DDT (in dt's dtype) = d step (DSTEP + g A) through the clamp and softplus; DA_PART[b * nc + c, h] =
    sum_t g step and DBIAS_PART[b * nc + c, h] = sum_t DDT (summed in PyTorch). With HAS_W, DW (Bt, H, Tp)
    holds per-token terms whose gradient is a prefix sum (added to g). Grid (Bt * nc, cdiv(H, BLOCK_H))."""
    pid = tl.program_id(0).to(tl.int64)
    b, c = pid // nc, pid % nc
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    l = tl.arange(0, BLOCK_L)
    t = c * L + l
    ok = (l < L)[:, None] & (t < T)[:, None] & h_ok[None, :]
    pre, sp, step = dt_step(DT, DT_BIAS, b, t, h, ok, T, H, lo, hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    da = tl.load(DACUM + (b * H + h[None, :]) * Tp + t[:, None], mask=ok, other=0.0)
    nb = tl.arange(0, BLOCK_NB)
    dend = tl.sum(tl.load(DEND + ((b * H + h[:, None]) * nc + c) * NB + nb[None, :],
                          mask=h_ok[:, None] & (nb[None, :] < NB), other=0.0), axis=1)
    end = tl.minimum(L, T - c * L) - 1  # the chunk's last real token
    da += tl.where((l == end)[:, None], dend[None, :], 0.0)
    g = tl.cumsum(da, axis=0, reverse=True)
    if HAS_W:  # per-token outgoing-state terms w_s: the gradient of step_k * A gets sum_{s < k} w_s
        w = tl.load(DW + (b * H + h[None, :]) * Tp + t[:, None], mask=ok, other=0.0)
        g += tl.cumsum(w, axis=0) - w
    a_h = tl.load(A + h, mask=h_ok, other=0.0).to(tl.float32)
    dstep = tl.load(DSTEP + (b * T + t[:, None]) * H + h[None, :], mask=ok, other=0.0) + g * a_h[None, :]
    tl.store(DA_PART + pid * H + h, tl.sum(tl.where(ok, g * step, 0.0), axis=0), mask=h_ok)
    dv = dstep
    if HAS_LIMIT:
        dv = tl.where((sp >= lo) & (sp <= hi), dv, 0.0)
    if SOFTPLUS:
        dv = tl.where(pre > 20.0, dv, dv / (1.0 + tl.exp(-pre)))
    dv = tl.where(ok, dv, 0.0)
    tl.store(DDT + (b * T + t[:, None]) * H + h[None, :], dv.to(DDT.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        tl.store(DBIAS_PART + pid * H + h, tl.sum(dv, axis=0), mask=h_ok)
