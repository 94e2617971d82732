"""ParaRNN's Newton solver in Triton, one fused kernel per pass (the "triton" backend): the forward's
passes below, and the backward (implicit function theorem, newton.py B1-B2) as one reverse pass.

A pass is one program per (row, block of BLOCK_D channels) walking the sequence in chunks of CHUNK
tokens, as triton.py's scan does, with the cell inside:
    GUESS     s_t = f(0, u_t)                                                     (N0)
    STEP      prev_t = keep_t s_{t-1} (the initial state at t = 0); f_t, J_t = the cell and its
              Jacobian at (prev_t, u_t); r_t = f_t - s_t; delta_t = keep_t J_t delta_{t-1} + r_t by
              the chunk's associative scan and the carry; s'_t = s_t + delta_t   (N1, N2)
    RESIDUAL  max |f_t - s_t| only
    BACKWARD  (`_newton_backward`, chunks in reverse) A_t = keep_{t+1} J_{t+1}^T from the cell at token
              t + 1; lam_t = A_t lam_{t+1} + g_t by the reverse scan and the carry (B1); then the
              vector-Jacobian product of the cell at token t with lam_t: du_t, the a / p gradients
              (summed per program) and, at t = 0, the initial state's (B2)
Each pass reads u and the states once and writes the states once (the unfused form runs ~30
element-wise PyTorch ops per step). STEP and RESIDUAL write each program's max |r| (NaN counted as
inf); the host reads it only when `tol` asks for an early stop. Float32 in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from undertow.kernels.pararnn import triton as tiles  # CHUNK, BLOCK_D: read at call time (tests shrink them)
from undertow.kernels.pararnn.triton import _compose1, _compose2, _row

GUESS, STEP, RESIDUAL = 0, 1, 2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _gru(h, uz, ur, uh, az, ar, ah):
    """G1-G4 and dh'/dh (newton.py's step_and_jacobian)."""
    z = _sigmoid(az * h + uz)
    r = _sigmoid(ar * h + ur)
    ht = _tanh(ah * (r * h) + uh)
    dz = z * (1.0 - z) * az
    dr = r * (1.0 - r) * ar
    dht = (1.0 - ht * ht) * ah * (r + h * dr)
    return h + z * (ht - h), dz * (ht - h) + z * dht + (1.0 - z)


@triton.jit
def _lstm(c, h, uf, uc, uo, af, ac, ao, pf, po):
    """L1-L5 and the 2x2 Jacobian d(c', h')/d(c, h)."""
    f = _sigmoid(af * h + uf + pf * c)
    ct = _tanh(ac * h + uc)
    cn = f * c + (1.0 - f) * ct
    o = _sigmoid(ao * h + uo + po * cn)
    tc = _tanh(cn)
    df = f * (1.0 - f)
    jcc = f + (c - ct) * df * pf
    jch = (c - ct) * df * af + (1.0 - f) * (1.0 - ct * ct) * ac
    do = o * (1.0 - o)
    via = do * po * tc + o * (1.0 - tc * tc)
    return cn, o * tc, jcc, jch, via * jcc, do * ao * tc + via * jch


@triton.jit
def _newton_pass(U, A, P, INIT, KEEP, S_IN, S_OUT, RES, T, D, LSTM: tl.constexpr, S: tl.constexpr,
                 MODE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """U (B, T, 3, D), A (3, D), P (2, D), INIT (B, S, D), KEEP (B, T), S_IN / S_OUT (B, T, S, D), all
    contiguous float32; RES (B, cdiv(D, BLOCK_D)); S = 2 for the LSTM, else 1. Grid (B, cdiv(D, BLOCK_D))."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    dd = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    rows = tl.arange(0, CHUNK)
    a0 = tl.load(A + dd, mask=dmask, other=0.0)[None, :]
    a1 = tl.load(A + D + dd, mask=dmask, other=0.0)[None, :]
    a2 = tl.load(A + 2 * D + dd, mask=dmask, other=0.0)[None, :]
    p0 = tl.load(P + dd, mask=dmask, other=0.0)[None, :]  # the GRU's P is any (2, D), never used
    p1 = tl.load(P + D + dd, mask=dmask, other=0.0)[None, :]
    init0 = tl.load(INIT + b * S * D + dd, mask=dmask, other=0.0)[None, :]
    init1 = tl.load(INIT + (b * S + S - 1) * D + dd, mask=dmask, other=0.0)[None, :]
    carry0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    carry1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    worst = tl.zeros([BLOCK_D], dtype=tl.float32)
    for chunk in range(0, tl.cdiv(T, CHUNK)):
        t = chunk * CHUNK + rows
        tmask = t < T
        mask = tmask[:, None] & dmask[None, :]
        t64 = t.to(tl.int64)
        ubase = ((b * T + t64) * 3)[:, None] * D + dd[None, :]
        u0 = tl.load(U + ubase, mask=mask, other=0.0)
        u1 = tl.load(U + ubase + D, mask=mask, other=0.0)
        u2 = tl.load(U + ubase + 2 * D, mask=mask, other=0.0)
        sbase = ((b * T + t64) * S)[:, None] * D + dd[None, :]
        if MODE == 0:
            zero = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
            if LSTM:
                c_new, h_new, _, _, _, _ = _lstm(zero, zero, u0, u1, u2, a0, a1, a2, p0, p1)
                tl.store(S_OUT + sbase, c_new, mask=mask)
                tl.store(S_OUT + sbase + D, h_new, mask=mask)
            else:
                h_new, _ = _gru(zero, u0, u1, u2, a0, a1, a2)
                tl.store(S_OUT + sbase, h_new, mask=mask)
        else:
            keep = tl.load(KEEP + b * T + t64, mask=tmask, other=0.0)[:, None]
            first = (t == 0)[:, None]
            pmask = mask & (t > 0)[:, None]
            pbase = sbase - S * D  # token t - 1
            s0 = tl.load(S_IN + sbase, mask=mask, other=0.0)
            q0 = keep * tl.where(first, init0, tl.load(S_IN + pbase, mask=pmask, other=0.0))
            if LSTM:
                s1 = tl.load(S_IN + sbase + D, mask=mask, other=0.0)
                q1 = keep * tl.where(first, init1, tl.load(S_IN + pbase + D, mask=pmask, other=0.0))
                f0, f1, j00, j01, j10, j11 = _lstm(q0, q1, u0, u1, u2, a0, a1, a2, p0, p1)
                r0 = tl.where(mask, f0 - s0, 0.0)
                r1 = tl.where(mask, f1 - s1, 0.0)
                bad = tl.maximum(tl.abs(r0), tl.abs(r1))
            else:
                f0, j00 = _gru(q0, u0, u1, u2, a0, a1, a2)
                r0 = tl.where(mask, f0 - s0, 0.0)
                bad = tl.abs(r0)
            bad = tl.where(bad == bad, bad, float("inf"))  # NaN counted as inf: never below a tolerance
            worst = tl.maximum(worst, tl.max(bad, axis=0))
            if MODE == 1:
                if LSTM:
                    m00, m01, m10, m11, v0, v1 = tl.associative_scan(
                        (keep * j00, keep * j01, keep * j10, keep * j11, r0, r1), 0, _compose2)
                    x0 = v0 + m00 * carry0[None, :] + m01 * carry1[None, :]
                    x1 = v1 + m10 * carry0[None, :] + m11 * carry1[None, :]
                    tl.store(S_OUT + sbase, s0 + x0, mask=mask)
                    tl.store(S_OUT + sbase + D, s1 + x1, mask=mask)
                    carry0, carry1 = _row(x0, rows, CHUNK - 1), _row(x1, rows, CHUNK - 1)
                else:
                    m, v = tl.associative_scan((keep * j00, r0), 0, _compose1)
                    x0 = v + m * carry0[None, :]
                    tl.store(S_OUT + sbase, s0 + x0, mask=mask)
                    carry0 = _row(x0, rows, CHUNK - 1)
    tl.store(RES + b * tl.num_programs(1) + blk, tl.max(worst, axis=0))


@triton.jit
def _gru_vjp(h, uz, ur, uh, az, ar, ah, lam):
    """The VJP of G1-G4 at (h, u) with lam: (d u_z, d u_r, d u_h, d prev h); the a gradients are
    (d u_z h, d u_r h, d u_h r h), returned as the fifth element r h."""
    z = _sigmoid(az * h + uz)
    r = _sigmoid(ar * h + ur)
    ht = _tanh(ah * (r * h) + uh)
    pz = lam * (ht - h) * z * (1.0 - z)
    ph = lam * z * (1.0 - ht * ht)
    pr = ph * ah * h * r * (1.0 - r)
    return pz, pr, ph, lam * (1.0 - z) + pz * az + ph * ah * r + pr * ar, r * h


@triton.jit
def _lstm_vjp(c, h, uf, uc, uo, af, ac, ao, pf, po, lc, lh):
    """The VJP of L1-L5 at (c, h, u) with (lc, lh): (d u_f, d u_c, d u_o, d prev c, d prev h, c')."""
    f = _sigmoid(af * h + uf + pf * c)
    ct = _tanh(ac * h + uc)
    cn = f * c + (1.0 - f) * ct
    o = _sigmoid(ao * h + uo + po * cn)
    tc = _tanh(cn)
    pre_o = lh * tc * o * (1.0 - o)
    gcn = lc + lh * o * (1.0 - tc * tc) + pre_o * po
    pre_f = gcn * (c - ct) * f * (1.0 - f)
    pre_c = gcn * (1.0 - f) * (1.0 - ct * ct)
    return pre_f, pre_c, pre_o, gcn * f + pre_f * pf, pre_o * ao + pre_c * ac + pre_f * af, cn


@triton.jit
def _newton_backward(U, A, P, INIT, KEEP, S, G, DU, DA, DINIT, T, D, LSTM: tl.constexpr, NS: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """U, A, P, INIT, KEEP as _newton_pass; S the solution and G its gradient (B, T, S, D); writes
    DU (B, T, 3, D), DA (B, 5, D) (this row's a then p gradients) and DINIT (B, NS, D); NS as S above."""
    b = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    rows = tl.arange(0, CHUNK)
    a0 = tl.load(A + dd, mask=dmask, other=0.0)[None, :]
    a1 = tl.load(A + D + dd, mask=dmask, other=0.0)[None, :]
    a2 = tl.load(A + 2 * D + dd, mask=dmask, other=0.0)[None, :]
    p0 = tl.load(P + dd, mask=dmask, other=0.0)[None, :]
    p1 = tl.load(P + D + dd, mask=dmask, other=0.0)[None, :]
    init0 = tl.load(INIT + b * NS * D + dd, mask=dmask, other=0.0)[None, :]
    init1 = tl.load(INIT + (b * NS + NS - 1) * D + dd, mask=dmask, other=0.0)[None, :]
    carry0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    carry1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc4 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dinit0 = tl.zeros([BLOCK_D], dtype=tl.float32)  # d prev at the chunk's first token: t = 0 after the loop
    dinit1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    chunks = tl.cdiv(T, CHUNK)
    for step in range(0, chunks):
        t = (chunks - 1 - step) * CHUNK + rows
        t64 = t.to(tl.int64)
        mask = (t < T)[:, None] & dmask[None, :]
        nmask = (t + 1 < T)[:, None] & dmask[None, :]  # token t + 1 exists
        pmask = mask & (t > 0)[:, None]
        first = (t == 0)[:, None]
        sbase = ((b * T + t64) * NS)[:, None] * D + dd[None, :]
        ubase = ((b * T + t64) * 3)[:, None] * D + dd[None, :]
        keep = tl.load(KEEP + b * T + t64, mask=t < T, other=0.0)[:, None]
        keep_next = tl.load(KEEP + b * T + t64 + 1, mask=t + 1 < T, other=0.0)[:, None]
        un0 = tl.load(U + ubase + 3 * D, mask=nmask, other=0.0)
        un1 = tl.load(U + ubase + 4 * D, mask=nmask, other=0.0)
        un2 = tl.load(U + ubase + 5 * D, mask=nmask, other=0.0)
        u0 = tl.load(U + ubase, mask=mask, other=0.0)
        u1 = tl.load(U + ubase + D, mask=mask, other=0.0)
        u2 = tl.load(U + ubase + 2 * D, mask=mask, other=0.0)
        g0 = tl.load(G + sbase, mask=mask, other=0.0)
        s0 = tl.load(S + sbase, mask=mask, other=0.0)  # s_t: token t + 1's previous state
        q0 = keep * tl.where(first, init0, tl.load(S + sbase - NS * D, mask=pmask, other=0.0))
        if LSTM:
            g1 = tl.load(G + sbase + D, mask=mask, other=0.0)
            s1 = tl.load(S + sbase + D, mask=mask, other=0.0)
            q1 = keep * tl.where(first, init1, tl.load(S + sbase - NS * D + D, mask=pmask, other=0.0))
            _, _, j00, j01, j10, j11 = _lstm(keep_next * s0, keep_next * s1, un0, un1, un2, a0, a1, a2, p0, p1)
            # A_t = keep_{t+1} J_{t+1}^T
            m00, m01, m10, m11, l0, l1 = tl.associative_scan(
                (keep_next * j00, keep_next * j10, keep_next * j01, keep_next * j11, g0, g1), 0, _compose2, reverse=True)
            lam0 = l0 + m00 * carry0[None, :] + m01 * carry1[None, :]
            lam1 = l1 + m10 * carry0[None, :] + m11 * carry1[None, :]
            lam0 = tl.where(mask, lam0, 0.0)
            lam1 = tl.where(mask, lam1, 0.0)
            carry0, carry1 = _row(lam0, rows, 0), _row(lam1, rows, 0)
            pf_, pc_, po_, dc, dh, cn = _lstm_vjp(q0, q1, u0, u1, u2, a0, a1, a2, p0, p1, lam0, lam1)
            tl.store(DU + ubase, pf_, mask=mask)
            tl.store(DU + ubase + D, pc_, mask=mask)
            tl.store(DU + ubase + 2 * D, po_, mask=mask)
            acc0 += tl.sum(pf_ * q1, axis=0)
            acc1 += tl.sum(pc_ * q1, axis=0)
            acc2 += tl.sum(po_ * q1, axis=0)
            acc3 += tl.sum(pf_ * q0, axis=0)
            acc4 += tl.sum(po_ * cn, axis=0)
            dinit0, dinit1 = _row(dc, rows, 0), _row(dh, rows, 0)
        else:
            _, j00 = _gru(keep_next * s0, un0, un1, un2, a0, a1, a2)
            m, l0 = tl.associative_scan((keep_next * j00, g0), 0, _compose1, reverse=True)
            lam0 = tl.where(mask, l0 + m * carry0[None, :], 0.0)
            carry0 = _row(lam0, rows, 0)
            pz, pr, ph, dh, rh = _gru_vjp(q0, u0, u1, u2, a0, a1, a2, lam0)
            tl.store(DU + ubase, pz, mask=mask)
            tl.store(DU + ubase + D, pr, mask=mask)
            tl.store(DU + ubase + 2 * D, ph, mask=mask)
            acc0 += tl.sum(pz * q0, axis=0)
            acc1 += tl.sum(pr * q0, axis=0)
            acc2 += tl.sum(ph * rh, axis=0)
            dinit0 = _row(dh, rows, 0)
    tl.store(DINIT + b * NS * D + dd, dinit0, mask=dmask)
    if LSTM:
        tl.store(DINIT + (b * NS + 1) * D + dd, dinit1, mask=dmask)
    base = b * 5 * D + dd
    tl.store(DA + base, acc0, mask=dmask)
    tl.store(DA + base + D, acc1, mask=dmask)
    tl.store(DA + base + 2 * D, acc2, mask=dmask)
    tl.store(DA + base + 3 * D, acc3, mask=dmask)
    tl.store(DA + base + 4 * D, acc4, mask=dmask)


def newton_backward_triton(cell: str, u, a, p, init, keep, states, g) -> tuple:
    """newton.py's backward (eqs. B1-B2) in one fused reverse pass at the solution `states` (B, T, S, D)
    for its gradient g -> (du (B, T, 3, D), da (3, D), dp (2, D) or None, dinit (B, S, D))."""
    B, T, _, D = u.shape
    uc, ac, initc = u.float().contiguous(), a.float().contiguous(), init.float().contiguous()
    pc = (ac[:2] if p is None else p).float().contiguous()
    keepc = keep.reshape(B, T).float().contiguous()
    du, dinit = torch.zeros_like(uc), torch.zeros_like(initc)
    dap = u.new_zeros(B, 5, D)
    if u.numel():
        _newton_backward[(B, triton.cdiv(D, tiles.BLOCK_D))](
            uc, ac, pc, initc, keepc, states.float().contiguous(), g.float().contiguous(), du, dap, dinit, T, D,
            LSTM=cell == "lstm", NS=2 if cell == "lstm" else 1, CHUNK=tiles.CHUNK, BLOCK_D=tiles.BLOCK_D)
    dap = dap.sum(0)
    return du, dap[:3], None if p is None else dap[3:], dinit


def newton_solve_triton(cell: str, u, a, p, init, keep, iterations: int, tol: float | None) -> tuple:
    """newton.py's `newton_solve` (eqs. N0-N2) in fused passes: u (B, T, 3, D), a (3, D), p (2, D) or
    None, init (B, S, D), keep (B, T, 1, 1), float32 -> (states (B, T, S, D), residual 0-d)."""
    B, T, _, D = u.shape
    S = init.shape[1]
    u, a, init = u.float().contiguous(), a.float().contiguous(), init.float().contiguous()
    p = (a[:2] if p is None else p).float().contiguous()
    keep = keep.reshape(B, T).float().contiguous()
    states, spare = u.new_empty(B, T, S, D), u.new_empty(B, T, S, D)
    grid = (B, triton.cdiv(D, tiles.BLOCK_D))
    res = u.new_zeros(grid)

    def run(mode: int, s_in, s_out) -> torch.Tensor:
        _newton_pass[grid](u, a, p, init, keep, s_in, s_out, res, T, D, LSTM=cell == "lstm", S=S, MODE=mode,
                           CHUNK=tiles.CHUNK, BLOCK_D=tiles.BLOCK_D)
        return res.amax()

    if states.numel() == 0:
        return states, u.new_zeros(())
    run(GUESS, states, states)
    for _ in range(iterations):
        residual = run(STEP, states, spare)  # the residual at `states`, before the update
        if tol is not None and residual <= tol:
            return states, residual
        states, spare = spare, states
    return states, run(RESIDUAL, states, spare)
