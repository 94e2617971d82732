"""The chunkwise Triton mLSTM's backward: the exact adjoint of triton_chunk.py's forward (chunked.py's
math), the stabilizers and the max(|n^T q|, exp(-m)) branch included. Derivation:
docs/mlstm_kernel_notes.md, "Chunkwise Triton backward".

Per chunk c (state (C_c, n_c, m_c) before it, e its last real token), with P[t, s] = exp(D[t, s] - m_t)
on the document-causal mask, S = (q k^T) * P, inter_t the carried state's weight, z_t the denominator,
dnum_t = scale dh_t / z_t and dden_t = scale d loss / d den_t:
  1. `_chunk_dstates` (per v tile, batch * head, chunks in reverse): the state adjoints, a linear
     recurrence: dC_c = inter_e dC_{c+1} + sum_t inter_t q_t dnum_t^T, dn_c = inter_e dn_{c+1} +
     sum_t inter_t dden_t q_t.
  2. `_chunk_bwd_q` and `_chunk_bwd_kv` (per chunk, batch * head, v tile, all parallel; each recomputes
     P, S = (q k^T) * P and dS = dnum v^T + dden, so that neither holds every tile at once): dq, d inter_t
     and the row sums of dD = dS * S (query side); dk, dv and dD's column sums (key side), with the
     state row e (C_{c+1} = inter_e C_c + sum_s P[e, s] k_s v_s^T) from dC_{c+1}.
  3. PyTorch on (B, H, NC, L) scalars (`_gate_chain`): the stabilizers. h and the states depend on
     the m sequence only through each m_t (C, n are stored times exp(-m), whatever m is), so the
     explicit gradient G_t of m_t (P's row t, inter_t, z_t; the state row at e; the next chunk's g) is
     routed to i~, logsigmoid(f~) and the initial m exactly as the reference's recurrence
     m_t = max(lf_t + m_{t-1}, i~_t) routes it, torch.maximum's ties included: a scalar linear
     recurrence, in chunks ((L, L) products of the max's weights) and across them ((NC, NC) products).
     The explicit parts of D (base_t - base_s + i~_s) and g go to i~ and, through base (a within-document
     cumulative sum of logsigmoid(f~)), to f~.
Ties of the stabilizer's max therefore get the reference's gradient (chunked.py's autograd, whose amax
splits a tie evenly, does not there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from undertow.kernels.dispatch import segment_starts
from undertow.kernels.mlstm.chunked import _chunks, chunk_documents
from undertow.kernels.mlstm.triton_chunk_common import NUM_WARPS, _blocks, _chunk_gates, _dot


@triton.jit
def _chunk_dstates(Q, DH, A1, A2, INTER, DCF, DNF, DCS, DNS,
                   T, H, Dqk, Dv, L, NC,
                   IS_F32: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """DCS (B, H, NC + 1, Dqk, Dv), DNS (B, H, NC + 1, Dqk): the adjoint of the state before each chunk
    (index NC: the final state's cotangent). A1_t = scale inter_t / z_t, A2_t = scale inter_t dden_t (B, T, H)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    tt = tl.arange(0, BL)
    kmask, vmask = kk < Dqk, vv < Dv
    cmask = kmask[:, None] & vmask[None, :]
    c_off = kk[:, None] * Dv + vv[None, :]
    n_mask = kk < tl.where(pid_v == 0, Dqk, 0)
    dC = tl.load(DCF + bh * Dqk * Dv + c_off, mask=cmask, other=0.0)
    dn = tl.load(DNF + bh * Dqk + kk, mask=kmask, other=0.0)
    for cc in range(NC):
        c = NC - 1 - cc
        ck = bh * (NC + 1) + c + 1
        tl.store(DCS + ck * Dqk * Dv + c_off, dC, mask=cmask)
        tl.store(DNS + ck * Dqk + kk, dn, mask=n_mask)
        pos = c * L + tt
        real = (tt < L) & (pos < T)
        row = (b * T + pos) * H + h
        q = tl.load(Q + row[:, None] * Dqk + kk[None, :], mask=real[:, None] & kmask[None, :], other=0.0)
        dh = tl.load(DH + row[:, None] * Dv + vv[None, :], mask=real[:, None] & vmask[None, :], other=0.0)
        a1 = tl.load(A1 + row, mask=real, other=0.0)
        a2 = tl.load(A2 + row, mask=real, other=0.0)
        e = tl.minimum(L, T - c * L) - 1
        inter_e = tl.load(INTER + (b * T + c * L + e) * H + h)
        qf = q.to(tl.float32)
        dC = inter_e * dC + _dot(tl.trans(qf * a1[:, None]), dh, IS_F32)
        dn = inter_e * dn + tl.sum(qf * a2[:, None], axis=0)
    tl.store(DCS + bh * (NC + 1) * Dqk * Dv + c_off, dC, mask=cmask)
    tl.store(DNS + bh * (NC + 1) * Dqk + kk, dn, mask=n_mask)


@triton.jit
def _chunk_scores(Q, K, V, I, F, SEG, MS, DH, R1, DD, b, h, bh, c, pid_v, T, H, Dqk, Dv, L, NC,
                  IS_F32: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """What both backward kernels recompute for chunk c and one v tile: the loaded q, k, v tiles, P, S, dS
    (the first v tile adds the tile-independent DD), dnum, dden and the token indices."""
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    kmask, vmask = kk < Dqk, vv < Dv
    own = (pid_v == 0).to(tl.float32)
    m_c = tl.load(MS + bh * (NC + 1) + c)
    same, base, offs, carried, tt = _chunk_gates(I, F, SEG, b, h, c, T, H, L, BL)
    D = base[:, None] + offs[None, :]
    g = base + tl.where(carried, m_c, 0.0)
    m = tl.maximum(g, tl.max(tl.where(same, D, float("-inf")), axis=1))
    P = tl.exp(tl.where(same, D - m[:, None], float("-inf")))
    pos = c * L + tt
    real = (tt < L) & (pos < T)
    row = (b * T + pos) * H + h
    lk = real[:, None] & kmask[None, :]
    lv = real[:, None] & vmask[None, :]
    q = tl.load(Q + row[:, None] * Dqk + kk[None, :], mask=lk, other=0.0)
    k = tl.load(K + row[:, None] * Dqk + kk[None, :], mask=lk, other=0.0)
    v = tl.load(V + row[:, None] * Dv + vv[None, :], mask=lv, other=0.0)
    dh = tl.load(DH + row[:, None] * Dv + vv[None, :], mask=lv, other=0.0).to(tl.float32)
    dnum = dh * tl.load(R1 + row, mask=real, other=0.0)[:, None]  # scale dh / z
    dden = tl.load(DD + row, mask=real, other=0.0) * own
    S = _dot(q, tl.trans(k), IS_F32) * P
    dS = _dot(dnum, tl.trans(v), IS_F32) + dden[:, None]
    return q, k, v, P, S, dS, dnum, dden, tt, real, row, kk, vv, kmask, vmask, lk, lv, own


@triton.jit
def _chunk_bwd_q(Q, K, V, I, F, SEG, CS, NS, MS, DCS, DNS, DH, R1, DD, INTER, DQP, ROWP, DINTP,
                 B, T, H, Dqk, Dv, L, NC,
                 IS_F32: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per (chunk, batch * head, v tile), the query side: this tile's partials (leading NV axis) of dq
    (NV, B, T, H, Dqk), of the row sums of dD = dS * S and of d inter_t (NV, B, T, H). R1_t = scale / z_t,
    DD_t = scale dden_t (B, T, H). The state row's share of the row sum at e is added by `_chunk_bwd_kv`."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    b, h = bh // H, bh % H
    q, k, v, P, S, dS, dnum, dden, tt, real, row, kk, vv, kmask, vmask, lk, lv, own = _chunk_scores(
        Q, K, V, I, F, SEG, MS, DH, R1, DD, b, h, bh, c, pid_v, T, H, Dqk, Dv, L, NC, IS_F32, BL, BK, BV)
    ck = bh * (NC + 1) + c
    cmask = kmask[:, None] & vmask[None, :]
    c_off = kk[:, None] * Dv + vv[None, :]
    C = tl.load(CS + ck * Dqk * Dv + c_off, mask=cmask, other=0.0)
    n = tl.load(NS + ck * Dqk + kk, mask=kmask, other=0.0) * own
    inter = tl.load(INTER + row, mask=real, other=0.0)
    dq = _dot(dS * P, k, IS_F32) + inter[:, None] * (_dot(dnum, tl.trans(C), IS_F32) + dden[:, None] * n[None, :])
    part = pid_v * (B * T * H) + row
    tl.store(DQP + part[:, None] * Dqk + kk[None, :], dq, mask=lk)
    tl.store(ROWP + part, tl.sum(dS * S, axis=1), mask=real)
    dinter = tl.sum(dnum * _dot(q, C, IS_F32), axis=1) + dden * tl.sum(q.to(tl.float32) * n[None, :], axis=1)
    # at e, C_{c+1} = inter_e C_c + ...: the state's share, against the adjoint of the state after the chunk
    dC1 = tl.load(DCS + (ck + 1) * Dqk * Dv + c_off, mask=cmask, other=0.0)
    dn1 = tl.load(DNS + (ck + 1) * Dqk + kk, mask=kmask, other=0.0) * own
    e = tl.minimum(L, T - c * L) - 1
    dinter += tl.where(tt == e, tl.sum(tl.sum(dC1 * C, axis=1), axis=0) + tl.sum(dn1 * n, axis=0), 0.0)
    tl.store(DINTP + part, dinter, mask=real)


@triton.jit
def _chunk_bwd_kv(Q, K, V, I, F, SEG, MS, DCS, DNS, DH, R1, DD, DKP, DV, ROWP, COLP,
                  B, T, H, Dqk, Dv, L, NC,
                  IS_F32: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per (chunk, batch * head, v tile), the key side: dv's tile, this tile's partials of dk and of the
    column sums of dD, the state row's share of dD (C_{c+1} = inter_e C_c + sum_s P[e, s] k_s v_s^T, n
    likewise) included; adds that share's row sum to ROWP at e (written by `_chunk_bwd_q`, launched first)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    b, h = bh // H, bh % H
    q, k, v, P, S, dS, dnum, dden, tt, real, row, kk, vv, kmask, vmask, lk, lv, own = _chunk_scores(
        Q, K, V, I, F, SEG, MS, DH, R1, DD, b, h, bh, c, pid_v, T, H, Dqk, Dv, L, NC, IS_F32, BL, BK, BV)
    ck = bh * (NC + 1) + c
    cmask = kmask[:, None] & vmask[None, :]
    dC1 = tl.load(DCS + (ck + 1) * Dqk * Dv + kk[:, None] * Dv + vv[None, :], mask=cmask, other=0.0)
    dn1 = tl.load(DNS + (ck + 1) * Dqk + kk, mask=kmask, other=0.0) * own
    e = tl.minimum(L, T - c * L) - 1
    at_e = tt == e
    p_e = tl.sum(tl.where(at_e[:, None], P, 0.0), axis=0)  # P[e, s]
    vdC = _dot(v, tl.trans(dC1), IS_F32) + dn1[None, :]  # (BL, BK): dC_{c+1} v_s + dn_{c+1}
    d_pe = tl.sum(k.to(tl.float32) * vdC, axis=1) * p_e  # d loss / d D[e, s] through the state
    dk = _dot(tl.trans(dS * P), q, IS_F32) + p_e[:, None] * vdC
    dv = _dot(tl.trans(S), dnum, IS_F32) + p_e[:, None] * _dot(k, dC1, IS_F32)
    part = pid_v * (B * T * H) + row
    tl.store(DKP + part[:, None] * Dqk + kk[None, :], dk, mask=lk)
    tl.store(DV + row[:, None] * Dv + vv[None, :], dv, mask=lv)
    tl.store(COLP + part, tl.sum(dS * S, axis=0) + d_pe, mask=real)
    at_row = real & at_e
    tl.store(ROWP + part, tl.load(ROWP + part, mask=at_row, other=0.0) + tl.sum(d_pe, axis=0), mask=at_row)


def _to_chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """(B, T, H) -> (B, H, NC, L) float32, zero-padded."""
    return _chunks(x[..., None], L, torch.float32)[..., 0]


def chunk_backward(q, k, v, i, f, seg, doc_ids, h, states, per_token, dh, dCf, dnf, dmf, eps: float, L: int):
    """Gradients of q, k, v, i, f (float32) and of the initial (C, n, m). `states`, `per_token`: what
    triton_chunk.chunk_forward returned (with store=True); dh (B, T, H, Dv); dCf, dnf, dmf the final state's
    cotangents (zeros when unused)."""
    B, T, H, Dqk = q.shape
    Dv = v.shape[3]
    BL, BK, BV, NV = _blocks(L, Dqk, Dv)
    NC = (T + L - 1) // L
    dev, f32 = q.device, torch.float32
    CS, NS, MS = states
    m_t, den, inter = per_token
    scale = Dqk ** -0.5
    # the denominator z = max(|den|, exp(-m)) + eps: its cotangent needs sum_v dh h, over every v tile
    dhf = dh.to(f32)
    z = torch.maximum(den.abs(), torch.exp(-m_t)) + eps
    dz = -(dhf * h.to(f32)).sum(-1) / z
    w_den = torch.where(den.abs() > torch.exp(-m_t), 1.0, torch.where(den.abs() < torch.exp(-m_t), 0.0, 0.5))
    dden = dz * w_den * torch.sign(den)
    dm_den = -dz * (1.0 - w_den) * torch.exp(-m_t)
    r1 = (scale / z).contiguous()
    dd = (scale * dden).contiguous()
    dh_k = dh.to(q.dtype).contiguous()
    DCS = torch.empty_like(CS)
    DNS = torch.empty_like(NS)
    is_f32 = q.dtype == torch.float32
    _chunk_dstates[(NV, B * H)](q, dh_k, (inter * r1).contiguous(), (inter * dd).contiguous(), inter,
                                dCf.to(f32).contiguous(), dnf.to(f32).contiguous(), DCS, DNS, T, H, Dqk, Dv, L, NC,
                                IS_F32=is_f32, BL=BL, BK=BK, BV=BV, num_warps=NUM_WARPS)
    dq_p = torch.empty(NV, B, T, H, Dqk, device=dev, dtype=f32)
    dk_p = torch.empty_like(dq_p)
    dv = torch.empty(B, T, H, Dv, device=dev, dtype=f32)
    rows_p, cols_p, dint_p = (torch.empty(NV, B, T, H, device=dev, dtype=f32) for _ in range(3))
    blocks = dict(IS_F32=is_f32, BL=BL, BK=BK, BV=BV, num_warps=NUM_WARPS)
    _chunk_bwd_q[(NC, B * H, NV)](q, k, v, i, f, seg, CS, NS, MS, DCS, DNS, dh_k, r1, dd, inter,
                                  dq_p, rows_p, dint_p, B, T, H, Dqk, Dv, L, NC, **blocks)
    _chunk_bwd_kv[(NC, B * H, NV)](q, k, v, i, f, seg, MS, DCS, DNS, dh_k, r1, dd,  # after _chunk_bwd_q: ROWP
                                   dk_p, dv, rows_p, cols_p, B, T, H, Dqk, Dv, L, NC, **blocks)
    di, df, dm0 = _gate_chain(i, f, doc_ids, L, MS, m_t, rows_p.sum(0), cols_p.sum(0), dint_p.sum(0), dm_den,
                              inter, dmf)
    return dq_p.sum(0), dk_p.sum(0), dv, di, df, DCS[:, :, 0], DNS[:, :, 0], dm0


def _gate_chain(i, f, doc_ids, L, MS, m_t, rows, cols, dint, dm_den, inter, dmf):
    """Step 3 of the module docstring, on (B, H, NC, L) float32 scalars. Returns d i~, d f~ (B, T, H)
    and the initial m's gradient (B, H).

    G_t, the explicit gradient of m_t (h and the states depend on the stabilizers only through them,
    whatever the m sequence: C, n are stored times exp(-m)), is routed to the inputs as the reference's
    recurrence m_t = max(lf_t + m_{t-1}, i~_t) does, torch.maximum's ties included: with w_t its weight
    of the first side (1, 0, 1/2), the total M_t = G_t + w_{t+1} M_{t+1} (cut at document starts), and
    i~_t receives (1 - w_t) M_t, lf_t receives w_t M_t. Without ties this is the argmax of chunked.py's
    max(g_t, max_s D[t, s]); at ties it is the reference's gradient (chunked.py's amax splits evenly)."""
    B, T, H = f.shape
    NC = MS.shape[2] - 1
    dev = f.device
    starts = segment_starts(doc_ids, (B, T), dev)[..., None]  # (B, T, 1)
    m_prev = torch.cat([MS[:, :, 0][:, None], m_t[:, :-1]], dim=1).masked_fill(starts, 0.0)
    a = F.logsigmoid(f.float()) + m_prev
    i32 = i.float()
    w = torch.where(a > i32, 1.0, torch.where(a < i32, 0.0, 0.5))
    w_back = w.masked_fill(starts, 0.0)  # what of M_t reaches m_{t-1}
    rows, cols, dint, dm_den, inter, w, w_back = (_to_chunks(x, L) for x in (rows, cols, dint, dm_den, inter, w,
                                                                             w_back))
    same, carried, _ = chunk_documents(doc_ids, B, T, L, dev)  # (B|1, 1, NC|1, L, L), (B, 1, NC, L)
    via_g = dint * inter  # the explicit gradient of g_t = base_t (+ m_c if carried)
    G = dm_den - rows - via_g  # explicit in m_t: P's row t (and the state's at e), inter_t, z_t
    to_carried = (carried * via_g).sum(-1)  # (B, H, NC): explicit in m_c, i.e. in the previous chunk's m_e
    ends = (torch.arange(1, NC + 1, device=dev) * L).clamp(max=T) - 1 - torch.arange(NC, device=dev) * L
    at_e = F.one_hot(ends, L).to(G.dtype)  # (NC, L)
    G = G + at_e * F.pad(to_carried[..., 1:], (0, 1))[..., None]
    G[:, :, -1] += at_e[-1] * dmf.float()[..., None]  # the final m is m at the last token
    # prods[u, t] = prod_{t < r <= u} w_back_r (u >= t, else 0): how much of M_u reaches t within the chunk
    later = torch.ones(L, L, dtype=torch.bool, device=dev).tril(-1)
    prods = torch.where(later, w_back[..., :, None], 1.0).cumprod(-2) * torch.ones(L, L, device=dev).tril()
    local = torch.einsum("...ut,...u->...t", prods, G)
    chunk_idx = torch.arange(NC, device=dev)
    from_end = prods[:, :, chunk_idx, ends]  # (B, H, NC, L): prods[e, t]
    into_next = F.pad(w_back[..., 1:, 0], (0, 1))  # w_back at the next chunk's first token
    # M at each chunk's first token: first_c = local_c + coef_c first_{c+1}, unrolled without a loop over
    # chunks: first_c = sum_{j >= c} (prod_{c <= r < j} coef_r) local_j, the products by a cumprod as above
    coef = from_end[..., 0] * into_next  # (B, H, NC)
    upper = torch.ones(NC, NC, dtype=torch.bool, device=dev).triu(1)  # j > c
    chain = torch.where(upper, F.pad(coef[..., :-1], (1, 0))[..., None, :], 1.0).cumprod(-1)
    chain = chain * torch.ones(NC, NC, device=dev).triu()  # (c, j): prod_{c <= r < j} coef_r for j >= c
    nxt = F.pad(torch.einsum("...cj,...j->...c", chain, local[..., 0])[..., 1:], (0, 1))
    M = local + from_end * (into_next * nxt)[..., None]
    dm0 = to_carried[..., 0] + w[..., 0, 0] * M[..., 0, 0]  # token 0 never resets: m_{-1} is the initial m
    dbase = rows - cols + via_g  # D[t, s] = base_t - base_s + i~_s, g_t = base_t (+ m_c)
    dlf = torch.einsum("...ts,...t->...s", same.to(dbase.dtype), dbase) + w * M
    di = cols + (1.0 - w) * M
    back = lambda x: x.reshape(B, H, NC * L)[..., :T].transpose(1, 2)  # noqa: E731
    return back(di), back(dlf) * torch.sigmoid(-f.float()), dm0
