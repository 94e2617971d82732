"""sLSTM in Triton: a fused recurrent kernel per (batch entry, head), the state (y, c, n, m) in
float32 registers across the whole time loop, and its exact backward.

Forward: each program walks time; per step it forms the four gate pre-activations
gates_t + y_{t-1} R[g, h] (a (D,) x (D, D) product per gate, R read from L2 each step), runs the
cell (reference.py, eqs. 8-17) and stores y, c, n, m of the step (what the backward reads).
Backward: each program walks time in reverse with the adjoint of the forward (the same formulas
as native_slstm.cpp's, torch.maximum's rule at ties), writing the gradient of the pre-activations,
which is also the gradient of `gates`; R's gradient, sum over (b, t) of y_{t-1}^T dpre, is one
einsum in PyTorch afterwards (a GEMM, instead of D x D atomics per step). Memory beyond the
inputs: four (B, T, H, D) float32 tensors of per-step state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _preactivation(G_ptr, R_ptr, y_prev, g, b, t, h, T, H, D, k, j, jmask, rmask, BD: tl.constexpr):
    """(BD,) gates[b, t, g, h] + y_prev R[g, h], float32 (y_prev: (BD,) over k)."""
    base = ((b * T + t) * 4 + g) * H * D + h * D
    x = tl.load(G_ptr + base + j, mask=jmask, other=0.0).to(tl.float32)
    Rg = tl.load(R_ptr + (g * H + h) * D * D + k[:, None] * D + j[None, :], mask=rmask, other=0.0).to(tl.float32)
    return x + tl.sum(y_prev[:, None] * Rg, axis=0)


@triton.jit
def _load_state(ptr, offs, stride, mask, PRESENT: tl.constexpr, BD: tl.constexpr):
    """The four (BD,) components (y, c, n, m) of a (4, B, H, D) state at `offs` (stride: B H D), or
    zeros when the state is absent."""
    if PRESENT:
        return (tl.load(ptr + offs, mask=mask, other=0.0), tl.load(ptr + stride + offs, mask=mask, other=0.0),
                tl.load(ptr + 2 * stride + offs, mask=mask, other=0.0),
                tl.load(ptr + 3 * stride + offs, mask=mask, other=0.0))
    zero = tl.zeros([BD], dtype=tl.float32)
    return zero, zero, zero, zero


@triton.jit
def _slstm_fwd(G_ptr, R_ptr, init_ptr, starts_ptr, Y_ptr, C_ptr, N_ptr, M_ptr, final_ptr, B, T, H, D,
               HAS_INIT: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, h = pid // H, pid % H
    j = tl.arange(0, BD)
    k = tl.arange(0, BD)
    jmask, kmask = j < D, k < D
    rmask = kmask[:, None] & jmask[None, :]
    state = (b * H + h) * D + j
    y, c, n, m = _load_state(init_ptr, state, B * H * D, jmask, HAS_INIT, BD)
    for t in range(T):
        reset = (tl.load(starts_ptr + b * T + t) != 0) & (t > 0)
        y = tl.where(reset, 0.0, y)
        c = tl.where(reset, 0.0, c)
        n = tl.where(reset, 0.0, n)
        m = tl.where(reset, 0.0, m)
        y_prev = tl.where(kmask, y, 0.0)  # the same (BD,) values, read along R's rows (k)
        i_raw = _preactivation(G_ptr, R_ptr, y_prev, 0, b, t, h, T, H, D, k, j, jmask, rmask, BD)
        f_raw = _preactivation(G_ptr, R_ptr, y_prev, 1, b, t, h, T, H, D, k, j, jmask, rmask, BD)
        z_raw = _preactivation(G_ptr, R_ptr, y_prev, 2, b, t, h, T, H, D, k, j, jmask, rmask, BD)
        o_raw = _preactivation(G_ptr, R_ptr, y_prev, 3, b, t, h, T, H, D, k, j, jmask, rmask, BD)
        log_f = _logsigmoid(f_raw) + m
        m = tl.maximum(i_raw, log_f)
        i_gate = tl.exp(i_raw - m)
        f_gate = tl.exp(log_f - m)
        c = f_gate * c + i_gate * (2.0 * _sigmoid(2.0 * z_raw) - 1.0)  # tanh
        n = f_gate * n + i_gate
        y = tl.where(jmask, _sigmoid(o_raw) * c / n, 0.0)
        out = ((b * T + t) * H + h) * D + j
        tl.store(Y_ptr + out, y, mask=jmask)
        tl.store(C_ptr + out, c, mask=jmask)
        tl.store(N_ptr + out, n, mask=jmask)
        tl.store(M_ptr + out, m, mask=jmask)
    tl.store(final_ptr + state, y, mask=jmask)
    tl.store(final_ptr + B * H * D + state, c, mask=jmask)
    tl.store(final_ptr + 2 * B * H * D + state, n, mask=jmask)
    tl.store(final_ptr + 3 * B * H * D + state, m, mask=jmask)


@triton.jit
def _load_prev(init_ptr, X_ptr, q, b, t, h, B, T, H, D, j, jmask, reset, HAS_INIT: tl.constexpr):
    """State component q (0 y, 1 c, 2 n, 3 m) before step t: zero after a reset, the initial state
    (or zeros) at t = 0, else the forward's value at t - 1."""
    prev_t = t - 1 + (t == 0)  # a valid address at t = 0 too; its value is not used there
    value = tl.load(X_ptr + ((b * T + prev_t) * H + h) * D + j, mask=jmask, other=0.0)
    if HAS_INIT:
        first = tl.load(init_ptr + q * B * H * D + (b * H + h) * D + j, mask=jmask, other=0.0)
    else:
        first = tl.zeros_like(value)
    value = tl.where(t == 0, first, value)
    return tl.where(reset, 0.0, value)


@triton.jit
def _back_through_R(R_ptr, dpre, g, h, H, D, k, j, rmask):
    """(BD,) over k: sum_j R[g, h, k, j] dpre[j], the part of dy_{t-1} that gate g carries."""
    Rg = tl.load(R_ptr + (g * H + h) * D * D + k[:, None] * D + j[None, :], mask=rmask, other=0.0).to(tl.float32)
    return tl.sum(Rg * dpre[None, :], axis=1)


@triton.jit
def _slstm_bwd(G_ptr, R_ptr, init_ptr, starts_ptr, Y_ptr, C_ptr, N_ptr, M_ptr, dY_ptr, dfinal_ptr, dG_ptr,
               dinit_ptr, B, T, H, D, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, h = pid // H, pid % H
    j = tl.arange(0, BD)
    k = tl.arange(0, BD)
    jmask, kmask = j < D, k < D
    rmask = kmask[:, None] & jmask[None, :]
    state = (b * H + h) * D + j
    gy, gc, gn, gm = _load_state(dfinal_ptr, state, B * H * D, jmask, HAS_DFINAL, BD)
    for step in range(T):
        t = T - 1 - step
        reset = (tl.load(starts_ptr + b * T + t) != 0) & (t > 0)
        y_prev = _load_prev(init_ptr, Y_ptr, 0, b, t, h, B, T, H, D, j, jmask, reset, HAS_INIT)
        c_prev = _load_prev(init_ptr, C_ptr, 1, b, t, h, B, T, H, D, j, jmask, reset, HAS_INIT)
        n_prev = _load_prev(init_ptr, N_ptr, 2, b, t, h, B, T, H, D, j, jmask, reset, HAS_INIT)
        m_prev = _load_prev(init_ptr, M_ptr, 3, b, t, h, B, T, H, D, j, jmask, reset, HAS_INIT)
        i_raw = _preactivation(G_ptr, R_ptr, y_prev, 0, b, t, h, T, H, D, k, j, jmask, rmask, BD)
        f_raw = _preactivation(G_ptr, R_ptr, y_prev, 1, b, t, h, T, H, D, k, j, jmask, rmask, BD)
        z_raw = _preactivation(G_ptr, R_ptr, y_prev, 2, b, t, h, T, H, D, k, j, jmask, rmask, BD)
        o_raw = _preactivation(G_ptr, R_ptr, y_prev, 3, b, t, h, T, H, D, k, j, jmask, rmask, BD)
        out = ((b * T + t) * H + h) * D + j
        c_new = tl.load(C_ptr + out, mask=jmask, other=0.0)
        n_new = tl.load(N_ptr + out, mask=jmask, other=1.0)
        log_f = _logsigmoid(f_raw) + m_prev
        m_new = tl.maximum(i_raw, log_f)
        i_gate = tl.exp(i_raw - m_new)
        f_gate = tl.exp(log_f - m_new)
        zt = 2.0 * _sigmoid(2.0 * z_raw) - 1.0
        og = _sigmoid(o_raw)
        dy = gy + tl.load(dY_ptr + out, mask=jmask, other=0.0)
        dog = dy * c_new / n_new
        dc = gc + dy * og / n_new
        dn = gn - dy * og * c_new / (n_new * n_new)
        dig = (dc * zt + dn) * i_gate
        dfg = (dc * c_prev + dn * n_prev) * f_gate
        dm_new = gm - dig - dfg
        share = tl.where(i_raw > log_f, 1.0, tl.where(i_raw < log_f, 0.0, 0.5))
        di = tl.where(jmask, dig + share * dm_new, 0.0)
        dlog_f = dfg + (1.0 - share) * dm_new
        df = tl.where(jmask, dlog_f * _sigmoid(-f_raw), 0.0)
        dz = tl.where(jmask, dc * i_gate * (1.0 - zt * zt), 0.0)
        do = tl.where(jmask, dog * og * (1.0 - og), 0.0)
        base = ((b * T + t) * 4) * H * D + h * D
        tl.store(dG_ptr + base + j, di, mask=jmask)
        tl.store(dG_ptr + base + H * D + j, df, mask=jmask)
        tl.store(dG_ptr + base + 2 * H * D + j, dz, mask=jmask)
        tl.store(dG_ptr + base + 3 * H * D + j, do, mask=jmask)
        # dy_{t-1}[k] = sum_g sum_j R[g, h, k, j] dpre_g[j]
        acc = _back_through_R(R_ptr, di, 0, h, H, D, k, j, rmask)
        acc += _back_through_R(R_ptr, df, 1, h, H, D, k, j, rmask)
        acc += _back_through_R(R_ptr, dz, 2, h, H, D, k, j, rmask)
        acc += _back_through_R(R_ptr, do, 3, h, H, D, k, j, rmask)
        gy = tl.where(reset, 0.0, acc)  # indexed by k: the same (BD,) positions as j
        gc = tl.where(reset, 0.0, dc * f_gate)
        gn = tl.where(reset, 0.0, dn * f_gate)
        gm = tl.where(reset, 0.0, dlog_f)
    tl.store(dinit_ptr + state, gy, mask=jmask)
    tl.store(dinit_ptr + B * H * D + state, gc, mask=jmask)
    tl.store(dinit_ptr + 2 * B * H * D + state, gn, mask=jmask)
    tl.store(dinit_ptr + 3 * B * H * D + state, gm, mask=jmask)


def _previous_outputs(Y: torch.Tensor, init: torch.Tensor | None, starts: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D): y_{t-1} as each step saw it (the initial y at t = 0, zeros after a reset)."""
    first = init[0][:, None] if init is not None else torch.zeros_like(Y[:, :1])
    prev = torch.cat([first, Y[:, :-1]], 1)
    return prev * (~starts).to(prev.dtype)[:, :, None, None]


class _SLSTMTriton(torch.autograd.Function):
    """(gates (B, T, 4, H, D), R (4, H, D, D), init (4, B, H, D) or None, starts (B, T) bool) ->
    (y (B, T, H, D) float32, final (4, B, H, D))."""

    @staticmethod
    def forward(ctx, gates, R, init, starts):
        B, T, _, H, D = gates.shape
        gates, R = gates.contiguous(), R.contiguous()
        starts8 = starts.to(torch.uint8).contiguous()
        states = torch.empty(4, B, T, H, D, device=gates.device, dtype=torch.float32)
        final = torch.empty(4, B, H, D, device=gates.device, dtype=torch.float32)
        init_arg = init.contiguous() if init is not None else final  # unread without HAS_INIT
        BD = triton.next_power_of_2(D)
        _slstm_fwd[(B * H,)](gates, R, init_arg, starts8, states[0], states[1], states[2], states[3], final,
                             B, T, H, D, HAS_INIT=init is not None, BD=BD)
        ctx.save_for_backward(gates, R, init, starts, states)
        return states[0], final

    @staticmethod
    def backward(ctx, dy, dfinal):
        gates, R, init, starts, states = ctx.saved_tensors
        B, T, _, H, D = gates.shape
        dgates = torch.empty(B, T, 4, H, D, device=gates.device, dtype=torch.float32)
        dinit = torch.empty(4, B, H, D, device=gates.device, dtype=torch.float32)
        dy = dy.float().contiguous()
        has_dfinal = dfinal is not None
        dfinal_arg = dfinal.float().contiguous() if has_dfinal else dinit
        init_arg = init.contiguous() if init is not None else dinit
        _slstm_bwd[(B * H,)](gates, R, init_arg, starts.to(torch.uint8).contiguous(), states[0], states[1],
                             states[2], states[3], dy, dfinal_arg, dgates, dinit, B, T, H, D,
                             HAS_INIT=init is not None, HAS_DFINAL=has_dfinal, BD=triton.next_power_of_2(D))
        y_prev = _previous_outputs(states[0], init, starts)
        dR = torch.einsum("bthk,btghj->ghkj", y_prev, dgates).to(R.dtype)
        return dgates.to(gates.dtype), dR, dinit if init is not None else None, None


def slstm_triton(gates, R, *, initial_state=None, doc_ids=None, return_final_state=False):
    """Same contract as `slstm_reference` (reference.py)."""
    from undertow.kernels.dispatch import segment_starts

    B, T, _, H, D = gates.shape
    init = None if initial_state is None else torch.stack([s.float() for s in initial_state])
    starts = segment_starts(doc_ids, (B, T), gates.device)
    y, final = _SLSTMTriton.apply(gates, R, init, starts)
    y = y.to(gates.dtype)
    return (y, tuple(final.unbind(0))) if return_final_state else y
