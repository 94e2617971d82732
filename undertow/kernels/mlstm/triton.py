"""mLSTM in Triton: a fused recurrent kernel (the state in float32 registers across the time loop) and
its exact backward: the adjoint of reference.py's recurrence, the stabilizer's max, the
max(|n^T q|, exp(-m)) denominator and torch.maximum's tie rule included. Derivation and tiling:
docs/mlstm_kernel_notes.md.

Forward: one program per (v tile, batch entry, head) holds C[:, v tile] (Dqk, BV), n (Dqk,) and m; n
and m do not depend on the v tile, every program recomputes them (a (Dqk,) update a step). It writes
h in float32 and, when a gradient is wanted, the state before every chunk of `chunk` steps plus the
final one (chunk checkpoints: (nc + 1) states per (batch, head), not one per step).

Backward, three passes:
  1. `_mlstm_bwd` (per v tile, chunks in reverse): recomputes the chunk's states from its checkpoint,
     then walks the chunk backwards carrying the adjoints dC (Dqk, BV) and dn. C_{t-1}, which the
     forget gate's gradient needs, is never stored nor inverted: sum(dC_t * f'_t C_{t-1}) =
     sum(dC_t * C_t) - i'_t k_t^T dC_t v_t, and sum(dC_t * C_t) runs backwards through the chunk from
     its exact value at the chunk's end (the carried dC against the next checkpoint); at the chunk's
     first step the term is exact (f' dC against the checkpoint itself). The kernel writes per-tile
     partials of dq, dk and of the gate terms f' df', i' di'.
  2. PyTorch sums the partials over v tiles (h's denominator couples all of Dv: its gradient needs
     sum_v dh h, computed beforehand from the float32 h).
  3. `_mlstm_bwd_gates` (per (batch, head) lane): the scalar chain of the stabilizer m backwards
     through time, giving d i~, d f~ and the initial m's gradient.
Memory beyond the inputs: h in float32, (nc + 1) checkpoints, and O(T) scalars per v tile.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from undertow.kernels.dispatch import segment_starts
from undertow.kernels.mlstm.reference import State, check_inputs
from undertow.kernels.mlstm.triton_tile import _initial_state, _state_tile

BLOCK_V = 32  # widest v tile: C's tile (Dqk x BV) and its adjoint stay in registers at Dqk = 128
GATE_LANES = 64  # (batch, head) lanes per program of the scalar backward


@triton.jit
def _step(C, n, m, Q, K, V, I, F, starts, b, t, h, T, H, Dqk, Dv, kk, vv, kmask, vmask, scale):
    """One step of the recurrence (reference.py) at token t of (b, h), the state reset first where a
    document starts: returns C_t, n_t, m_t, f'_t, i'_t, the weight d m_t / d (logsigmoid(f~_t) +
    m_{t-1}) as torch.maximum's backward gives it (1 where that side wins, 0 where i~_t wins, 1/2 at
    a tie) and the step's (scaled) q, k, v. One helper for the forward and the backward's recompute,
    so both take the same branches; its loads and the cell are in it because each jit call costs the
    interpreter ~1 ms."""
    reset = tl.load(starts + b * T + t) != 0
    C = tl.where(reset, 0.0, C)
    n = tl.where(reset, 0.0, n)
    m = tl.where(reset, 0.0, m)
    row = (b * T + t) * H + h
    q = tl.load(Q + row * Dqk + kk, mask=kmask, other=0.0).to(tl.float32) * scale
    k = tl.load(K + row * Dqk + kk, mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(V + row * Dv + vv, mask=vmask, other=0.0).to(tl.float32)
    i_raw = tl.load(I + row).to(tl.float32)
    f_raw = tl.load(F + row).to(tl.float32)
    a = tl.minimum(f_raw, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f_raw))) + m  # logsigmoid(f~) + m_{t-1}
    m_new = tl.maximum(a, i_raw)
    f_act = tl.exp(a - m_new)
    i_act = tl.exp(i_raw - m_new)
    C = f_act * C + i_act * (k[:, None] * v[None, :])
    n = f_act * n + i_act * k
    return C, n, m_new, f_act, i_act, tl.where(a > i_raw, 1.0, tl.where(a < i_raw, 0.0, 0.5)), q, k, v


@triton.jit
def _mlstm_fwd(Q, K, V, I, F, starts, C0, N0, M0, Hout, Cck, Nck, Mck, Cf, Nf, Mf,
               T, H, Dqk, Dv, NC, scale, eps,
               CHUNK: tl.constexpr, HAS_INIT: tl.constexpr, STORE_CKPT: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kk, vv, kmask, vmask, cmask, c_off, n_mask = _state_tile(pid_v, Dqk, Dv, BK, BV)
    first = pid_v == 0  # n and m are written by the first v tile only
    C, n, m = _initial_state(C0, N0, M0, bh, kk, kmask, c_off, cmask, Dqk, Dv, HAS_INIT, BK, BV)
    for t in range(T):
        if STORE_CKPT:
            if t % CHUNK == 0:  # the state before the chunk, before a reset at its first token
                ck = bh * (NC + 1) + t // CHUNK
                tl.store(Cck + ck * Dqk * Dv + c_off, C, mask=cmask)
                tl.store(Nck + ck * Dqk + kk, n, mask=n_mask)
                tl.store(Mck + ck, m, mask=first)
        C, n, m, f_act, i_act, w_carried, q, k, v = _step(C, n, m, Q, K, V, I, F, starts, b, t, h, T, H, Dqk, Dv,
                                                          kk, vv, kmask, vmask, scale)
        row = (b * T + t) * H + h
        numerator = tl.sum(C * q[:, None], axis=0)
        denominator = tl.maximum(tl.abs(tl.sum(n * q, axis=0)), tl.exp(-m)) + eps
        tl.store(Hout + row * Dv + vv, numerator / denominator, mask=vmask)
    if STORE_CKPT:  # checkpoint nc is the final state: the last chunk's end anchor in the backward
        ck = bh * (NC + 1) + NC
        tl.store(Cck + ck * Dqk * Dv + c_off, C, mask=cmask)
        tl.store(Nck + ck * Dqk + kk, n, mask=n_mask)
    tl.store(Cf + bh * Dqk * Dv + c_off, C, mask=cmask)
    tl.store(Nf + bh * Dqk + kk, n, mask=n_mask)
    tl.store(Mf + bh, m, mask=first)


@triton.jit
def _state_product(Cck, Nck, ck, dC, dn, own_n, c_off, cmask, kk, kmask, Dqk, Dv):
    """sum(dC * C) + own_n dn . n for the checkpoint ck's state (C's tile of this program)."""
    C = tl.load(Cck + ck * Dqk * Dv + c_off, mask=cmask, other=0.0)
    n = tl.load(Nck + ck * Dqk + kk, mask=kmask, other=0.0)
    return tl.sum(tl.sum(dC * C, axis=1), axis=0) + own_n * tl.sum(dn * n, axis=0)


@triton.jit
def _mlstm_bwd(Q, K, V, I, F, starts, DH, DOT, Cck, Nck, Mck, dCf, dNf,
               DQp, DKp, DV, GATE, SCR, E, W2, dC0, dN0,
               B, T, H, Dqk, Dv, NC, scale, eps,
               CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per (v tile, batch, head). Writes dv, this tile's partials of dq, dk (DQp, DKp: (NV, B, T, H, Dqk))
    and of f'_t df'_t, i'_t di'_t (GATE: (2, NV, B, T, H)), dC0's tile; the first tile adds every term
    of n and of the denominator (to dq, dk, GATE) and writes dn0 and, per step, the denominator's
    direct gradient of m (E) and the stabilizer's tie weight (W2), (B, T, H) each."""
    pid_v = tl.program_id(0)
    n_tiles = tl.num_programs(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kk, vv, kmask, vmask, cmask, c_off, n_mask = _state_tile(pid_v, Dqk, Dv, BK, BV)
    first = pid_v == 0
    own_n = first.to(tl.float32)  # n's terms are tile-independent: counted once, by the first tile
    BTH = B * T * H
    dC = tl.load(dCf + bh * Dqk * Dv + c_off, mask=cmask, other=0.0)
    dn = tl.load(dNf + bh * Dqk + kk, mask=kmask, other=0.0)
    # The adjoints carried into a chunk's last step e (from step e + 1 or the final state's cotangent)
    # against the state after step e (the next checkpoint): sum(dC * C_e) + dn . n_e, exact
    carry = _state_product(Cck, Nck, bh * (NC + 1) + NC, dC, dn, own_n, c_off, cmask, kk, kmask, Dqk, Dv)
    for cc in range(NC):
        c = NC - 1 - cc
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, T)
        ck = bh * (NC + 1) + c
        # pass 1, forward through the chunk from its checkpoint: dq (needs C_t) and the per-step scalars
        C = tl.load(Cck + ck * Dqk * Dv + c_off, mask=cmask, other=0.0)
        n = tl.load(Nck + ck * Dqk + kk, mask=kmask, other=0.0)
        m = tl.load(Mck + ck)
        for t in range(t0, t1):
            C, n, m, f_act, i_act, w_carried, q, k, v = _step(C, n, m, Q, K, V, I, F, starts, b, t, h, T, H, Dqk,
                                                              Dv, kk, vv, kmask, vmask, scale)
            row = (b * T + t) * H + h
            d = tl.sum(n * q, axis=0)
            exp_neg_m = tl.exp(-m)
            w_n = tl.where(tl.abs(d) > exp_neg_m, 1.0, tl.where(tl.abs(d) < exp_neg_m, 0.0, 0.5))  # as above
            denominator = tl.maximum(tl.abs(d), exp_neg_m) + eps
            d_den = -tl.load(DOT + row) / denominator  # d loss / d denominator = -(sum_v dh h) / den
            sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            dd = d_den * w_n * sign  # d loss / d (n^T q)
            dnum = tl.load(DH + row * Dv + vv, mask=vmask, other=0.0) / denominator
            dq_c = tl.sum(C * dnum[None, :], axis=1)  # C_t dnum_t
            tl.store(DQp + (pid_v * BTH + row) * Dqk + kk, scale * (dq_c + own_n * dd * n), mask=kmask)
            # q_t . dq_t unscaled: sum(C_t * q dnum^T) + (n_t . q) dd, this step's share of sum(dC_t * C_t)
            q_part = tl.sum(q * dq_c, axis=0) + own_n * dd * d
            scr = pid_v * BTH + row
            tl.store(SCR + scr, q_part)
            tl.store(SCR + n_tiles * BTH + scr, dd)
            tl.store(SCR + 2 * n_tiles * BTH + scr, denominator)
            tl.store(SCR + 3 * n_tiles * BTH + scr, f_act)
            tl.store(SCR + 4 * n_tiles * BTH + scr, i_act)
            tl.store(E + row, -exp_neg_m * d_den * (1.0 - w_n), mask=first)
            tl.store(W2 + row, w_carried, mask=first)
        # pass 2, backwards through the chunk: the adjoint of the recurrence
        for s in range(t1 - t0):
            t = t1 - 1 - s
            reset = tl.load(starts + b * T + t) != 0
            row = (b * T + t) * H + h
            q = tl.load(Q + row * Dqk + kk, mask=kmask, other=0.0).to(tl.float32) * scale
            k = tl.load(K + row * Dqk + kk, mask=kmask, other=0.0).to(tl.float32)
            v = tl.load(V + row * Dv + vv, mask=vmask, other=0.0).to(tl.float32)
            scr = pid_v * BTH + row
            q_part = tl.load(SCR + scr)
            dd = tl.load(SCR + n_tiles * BTH + scr)
            denominator = tl.load(SCR + 2 * n_tiles * BTH + scr)
            f_act = tl.load(SCR + 3 * n_tiles * BTH + scr)
            i_act = tl.load(SCR + 4 * n_tiles * BTH + scr)
            dnum = tl.load(DH + row * Dv + vv, mask=vmask, other=0.0) / denominator
            dC += q[:, None] * dnum[None, :]  # dC_t, dn_t: the carried adjoints plus this step's h
            dn += q * dd
            dC_v = tl.sum(dC * v[None, :], axis=1)
            k_part = i_act * (tl.sum(k * dC_v, axis=0) + own_n * tl.sum(k * dn, axis=0))  # i' di'
            f_part = q_part + carry - k_part  # f' df' = sum(dC_t * C_t) + dn_t . n_t - i' di'
            tl.store(GATE + pid_v * BTH + row, f_part)
            tl.store(GATE + (n_tiles + pid_v) * BTH + row, k_part)
            tl.store(DKp + (pid_v * BTH + row) * Dqk + kk, i_act * (dC_v + own_n * dn), mask=kmask)
            tl.store(DV + row * Dv + vv, i_act * tl.sum(dC * k[:, None], axis=0), mask=vmask)
            # to step t - 1: f' times the adjoints; nothing crosses a document start
            carry = tl.where(reset, 0.0, f_part)
            dC = tl.where(reset, 0.0, f_act * dC)
            dn = tl.where(reset, 0.0, f_act * dn)
        # f' df' at the chunk's first step, exact rather than by the difference above (which loses the
        # digits of 1/f' where f' is small): the adjoints carried out of it, f' dC, against the checkpoint
        # C_{t0 - 1}; the same number is the carry into the previous chunk's last step
        carry = _state_product(Cck, Nck, ck, dC, dn, own_n, c_off, cmask, kk, kmask, Dqk, Dv)
        tl.store(GATE + pid_v * BTH + (b * T + t0) * H + h, carry)
    tl.store(dC0 + bh * Dqk * Dv + c_off, dC, mask=cmask)
    tl.store(dN0 + bh * Dqk + kk, dn, mask=n_mask)


@triton.jit
def _mlstm_bwd_gates(F, starts, GATE, E, W2, dMf, DI, DF, dM0, B, T, H, NV, LANES: tl.constexpr):
    """The stabilizer's chain backwards through time, per (batch, head) lane: with F_t = f' df' and
    I_t = i' di' (summed over the v tiles), dm_t = (carried) + E_t - F_t - I_t; the max hands dm_t to
    logsigmoid(f~_t) + m_{t-1} (weight W2_t) and to i~_t (1 - W2_t)."""
    lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
    lmask = lanes < B * H
    b, h = lanes // H, lanes % H
    BTH = B * T * H
    dm_carried = tl.load(dMf + lanes, mask=lmask, other=0.0)
    for s in range(T):
        t = T - 1 - s
        row = (b * T + t) * H + h
        f_part = tl.zeros([LANES], dtype=tl.float32)
        i_part = tl.zeros([LANES], dtype=tl.float32)
        for j in range(NV):
            f_part += tl.load(GATE + j * BTH + row, mask=lmask, other=0.0)
            i_part += tl.load(GATE + (NV + j) * BTH + row, mask=lmask, other=0.0)
        dm = dm_carried + tl.load(E + row, mask=lmask, other=0.0) - f_part - i_part
        w_carried = tl.load(W2 + row, mask=lmask, other=0.0)
        d_carried = f_part + w_carried * dm  # d loss / d (logsigmoid(f~_t) + m_{t-1})
        f_raw = tl.load(F + row, mask=lmask, other=0.0).to(tl.float32)
        tl.store(DI + row, i_part + (1.0 - w_carried) * dm, mask=lmask)
        z = tl.exp(-tl.abs(f_raw))  # logsigmoid'(f~) = sigmoid(-f~), without overflow for large |f~|
        tl.store(DF + row, d_carried * tl.where(f_raw > 0, z, 1.0) / (1.0 + z), mask=lmask)
        reset = tl.load(starts + b * T + t, mask=lmask, other=0) != 0
        dm_carried = tl.where(reset, 0.0, d_carried)
    tl.store(dM0 + lanes, dm_carried, mask=lmask)


def _tiles(Dqk: int, Dv: int) -> tuple[int, int, int]:
    """(BK, BV, number of v tiles): all of Dqk in one tile, Dv in tiles of at most BLOCK_V."""
    BV = min(triton.next_power_of_2(Dv), BLOCK_V)
    return triton.next_power_of_2(Dqk), BV, triton.cdiv(Dv, BV)


class _MLSTMTriton(torch.autograd.Function):
    """(q, k (B, T, H, Dqk), v (B, T, H, Dv), i, f (B, T, H), C0, n0, m0 float32 or None, starts (B, T)
    bool, eps, chunk) -> (h (B, T, H, Dv) float32, C (B, H, Dqk, Dv), n (B, H, Dqk), m (B, H))."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, starts, eps, chunk):
        B, T, H, Dqk = q.shape
        Dv = v.shape[3]
        q, k, v, i, f = (x.contiguous() for x in (q, k, v, i, f))
        has_init = C0 is not None
        if has_init:
            C0, n0, m0 = (s.contiguous() for s in (C0, n0, m0))
        starts8 = starts.to(torch.uint8).contiguous()
        BK, BV, NV = _tiles(Dqk, Dv)
        NC = math.ceil(T / chunk)
        store_ckpt = any(ctx.needs_input_grad)
        dev = q.device
        h = torch.empty(B, T, H, Dv, device=dev, dtype=torch.float32)
        Cf = torch.empty(B, H, Dqk, Dv, device=dev, dtype=torch.float32)
        nf = torch.empty(B, H, Dqk, device=dev, dtype=torch.float32)
        mf = torch.empty(B, H, device=dev, dtype=torch.float32)
        ckpts = NC + 1 if store_ckpt else 0
        Cck = torch.empty(B, H, ckpts, Dqk, Dv, device=dev, dtype=torch.float32)
        Nck = torch.empty(B, H, ckpts, Dqk, device=dev, dtype=torch.float32)
        Mck = torch.empty(B, H, ckpts, device=dev, dtype=torch.float32)
        init = (C0, n0, m0) if has_init else (Cf, nf, mf)  # unread without HAS_INIT
        _mlstm_fwd[(NV, B * H)](q, k, v, i, f, starts8, *init, h, Cck, Nck, Mck, Cf, nf, mf,
                                T, H, Dqk, Dv, NC, Dqk ** -0.5, eps,
                                CHUNK=chunk, HAS_INIT=has_init, STORE_CKPT=store_ckpt, BK=BK, BV=BV)
        if store_ckpt:
            ctx.save_for_backward(q, k, v, i, f, starts8, h, Cck, Nck, Mck)
        ctx.shape, ctx.eps, ctx.chunk, ctx.has_init = (B, T, H, Dqk, Dv), eps, chunk, has_init
        ctx.dtypes = tuple(x.dtype for x in (q, k, v, i, f))
        return h, Cf, nf, mf

    @staticmethod
    def backward(ctx, dh, dCf, dnf, dmf):
        q, k, v, i, f, starts8, h, Cck, Nck, Mck = ctx.saved_tensors
        B, T, H, Dqk, Dv = ctx.shape
        BK, BV, NV = _tiles(Dqk, Dv)
        NC = math.ceil(T / ctx.chunk)
        dev, f32 = q.device, torch.float32
        dh = dh.to(f32).contiguous()
        dot = (dh * h).sum(-1).contiguous()  # sum_v dh h: the denominator's gradient couples every v tile
        dq_parts = torch.empty(NV, B, T, H, Dqk, device=dev, dtype=f32)
        dk_parts = torch.empty_like(dq_parts)
        dv = torch.empty(B, T, H, Dv, device=dev, dtype=f32)
        gate_parts = torch.empty(2, NV, B, T, H, device=dev, dtype=f32)
        scratch = torch.empty(5, NV, B, T, H, device=dev, dtype=f32)
        E = torch.empty(B, T, H, device=dev, dtype=f32)
        W2 = torch.empty_like(E)
        dC0 = torch.empty(B, H, Dqk, Dv, device=dev, dtype=f32)
        dn0 = torch.empty(B, H, Dqk, device=dev, dtype=f32)
        _mlstm_bwd[(NV, B * H)](q, k, v, i, f, starts8, dh, dot, Cck, Nck, Mck,
                                dCf.to(f32).contiguous(), dnf.to(f32).contiguous(),
                                dq_parts, dk_parts, dv, gate_parts, scratch, E, W2, dC0, dn0,
                                B, T, H, Dqk, Dv, NC, Dqk ** -0.5, ctx.eps, CHUNK=ctx.chunk, BK=BK, BV=BV)
        di = torch.empty(B, T, H, device=dev, dtype=f32)
        df = torch.empty_like(di)
        dm0 = torch.empty(B, H, device=dev, dtype=f32)
        _mlstm_bwd_gates[(triton.cdiv(B * H, GATE_LANES),)](f, starts8, gate_parts, E, W2, dmf.to(f32).contiguous(),
                                                             di, df, dm0, B, T, H, NV, LANES=GATE_LANES)
        grads = [g.to(dtype) for g, dtype in zip((dq_parts.sum(0), dk_parts.sum(0), dv, di, df), ctx.dtypes)]
        init_grads = (dC0, dn0, dm0) if ctx.has_init else (None, None, None)
        return (*grads, *init_grads, None, None, None)


def mlstm_triton(q, k, v, i, f, *, eps: float = 1e-6, chunk_size: int = 64, initial_state: State | None = None,
                 doc_ids=None, return_final_state: bool = False):
    """Same contract as `mlstm_reference` (reference.py); `chunk_size` is the checkpoint interval of the
    backward (memory (T / chunk_size) states per (batch, head); backward recompute per chunk)."""
    check_inputs(q, k, v, i, f, initial_state, doc_ids, chunk_size)
    if q.dtype == torch.float64:
        raise ValueError("mlstm backend 'triton' computes in float32: use 'chunked' or 'reference' for float64")
    B, T, H, _ = q.shape
    C0, n0, m0 = (None, None, None) if initial_state is None else (s.float() for s in initial_state)
    starts = segment_starts(doc_ids, (B, T), q.device)
    h, C, n, m = _MLSTMTriton.apply(q, k, v, i, f, C0, n0, m0, starts, eps, chunk_size)
    h = h.to(q.dtype)
    return (h, (C, n, m)) if return_final_state else h
