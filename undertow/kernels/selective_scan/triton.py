"""Mamba-1 selective scan in Triton: a sequential scan per (row, block of channels) with the
(BD, N) state in float32 registers, and a Triton backward.

Forward: each program walks time, h = exp(dt*A) * h + dt*u*B (h = 0 first where a document
starts), y = C . h, and stores h at the start of every chunk of CHUNK steps. Backward: each
program walks the chunks in reverse; it recomputes the chunk's states from the stored one into a
per-program scratch buffer, then runs the adjoint g_t = dy_t C_t + a_{t+1} g_{t+1} backwards in
time. Channel-local gradients (u, dt, A, initial_state) are written directly; those of B and C
sum over channels and are written per channel block, then summed in PyTorch. Memory beyond the
inputs: T/CHUNK states and CHUNK scratch states per row and channel. The softplus, D and z parts
run in PyTorch (chunked.selective_scan_from_core), shared with the chunked form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from undertow.kernels.selective_scan.chunked import selective_scan_from_core

CHUNK = 32


@triton.jit
def _step_inputs(u_ptr, dt_ptr, B_ptr, C_ptr, starts_ptr, b, t, d, n, dmask, nmask, T, Dc, N):
    """The (BD,) u and dt, (BN,) B and C, and the reset flag of step t, in float32."""
    row = b * T + t
    u = tl.load(u_ptr + row * Dc + d, mask=dmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + row * Dc + d, mask=dmask, other=0.0)
    Bt = tl.load(B_ptr + row * N + n, mask=nmask, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + row * N + n, mask=nmask, other=0.0).to(tl.float32)
    reset = tl.load(starts_ptr + row) != 0
    return u, dt, Bt, Ct, reset


@triton.jit
def _scan_fwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, starts_ptr, h0_ptr, y_ptr, hT_ptr, ckpt_ptr, T, Dc, N,
              L: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    dmask, nmask = d < Dc, n < N
    state = d[:, None] * N + n[None, :]
    smask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + state, mask=smask, other=0.0)
    h = tl.load(h0_ptr + b * Dc * N + state, mask=smask, other=0.0)
    n_chunks = tl.cdiv(T, L)
    for c in range(n_chunks):
        tl.store(ckpt_ptr + (b * n_chunks + c) * Dc * N + state, h, mask=smask)
        for t in range(c * L, tl.minimum(c * L + L, T)):
            u, dt, Bt, Ct, reset = _step_inputs(u_ptr, dt_ptr, B_ptr, C_ptr, starts_ptr, b, t, d, n, dmask, nmask,
                                                T, Dc, N)
            h = tl.where(reset, 0.0, h)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(y_ptr + (b * T + t) * Dc + d, tl.sum(h * Ct[None, :], axis=1), mask=dmask)
    tl.store(hT_ptr + b * Dc * N + state, h, mask=smask)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, starts_ptr, ckpt_ptr, dy_ptr, dhT_ptr, scratch_ptr,
              du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dh0_ptr, T, Dc, N,
              L: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """dB_ptr, dC_ptr: (Bt, n_dblocks, T, N) per-block partials; dA_ptr: (Bt, Dc, N) per-row partials."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    d = blk * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    dmask, nmask = d < Dc, n < N
    state = d[:, None] * N + n[None, :]
    smask = dmask[:, None] & nmask[None, :]
    scratch = scratch_ptr + (b * tl.num_programs(1) + blk) * L * BD * BN + tl.arange(0, BD)[:, None] * BN + n[None, :]
    partial = (b * tl.num_programs(1) + blk) * T * N
    A = tl.load(A_ptr + state, mask=smask, other=0.0)
    g = tl.load(dhT_ptr + b * Dc * N + state, mask=smask, other=0.0)
    dA = tl.zeros((BD, BN), dtype=tl.float32)
    n_chunks = tl.cdiv(T, L)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t0 = c * L
        t1 = tl.minimum(t0 + L, T)
        h_in = tl.load(ckpt_ptr + (b * n_chunks + c) * Dc * N + state, mask=smask, other=0.0)
        h = h_in
        for t in range(t0, t1):
            u, dt, Bt, Ct, reset = _step_inputs(u_ptr, dt_ptr, B_ptr, C_ptr, starts_ptr, b, t, d, n, dmask, nmask,
                                                T, Dc, N)
            h = tl.where(reset, 0.0, h)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (t - t0) * BD * BN, h)
        tl.debug_barrier()
        for j in range(t1 - t0):
            t = t1 - 1 - j
            u, dt, Bt, Ct, reset = _step_inputs(u_ptr, dt_ptr, B_ptr, C_ptr, starts_ptr, b, t, d, n, dmask, nmask,
                                                T, Dc, N)
            dy = tl.load(dy_ptr + (b * T + t) * Dc + d, mask=dmask, other=0.0)
            h = tl.load(scratch + (t - t0) * BD * BN)
            h_prev = tl.load(scratch + tl.maximum(t - t0 - 1, 0) * BD * BN)
            h_prev = tl.where(reset, 0.0, tl.where(t == t0, h_in, h_prev))
            a = tl.exp(dt[:, None] * A)
            g += dy[:, None] * Ct[None, :]
            g = tl.where(smask, g, 0.0)
            tl.store(dC_ptr + partial + t * N + n, tl.sum(dy[:, None] * h, axis=0), mask=nmask)
            tl.store(dB_ptr + partial + t * N + n, tl.sum(g * (dt * u)[:, None], axis=0), mask=nmask)
            gB = tl.sum(g * Bt[None, :], axis=1)
            da = g * h_prev * a  # d loss / d(dt * A)
            tl.store(du_ptr + (b * T + t) * Dc + d, gB * dt, mask=dmask)
            tl.store(ddt_ptr + (b * T + t) * Dc + d, gB * u + tl.sum(da * A, axis=1), mask=dmask)
            dA += da * dt[:, None]
            g = tl.where(reset, 0.0, g * a)
        tl.debug_barrier()
    tl.store(dh0_ptr + b * Dc * N + state, g, mask=smask)
    tl.store(dA_ptr + b * Dc * N + state, dA, mask=smask)


def _blocks(Dc: int, N: int) -> tuple[int, int]:
    """(BD, BN): BN covers N (<= 256); BD keeps the (BD, BN) state at 2048 floats at most."""
    if N > 256:
        raise ValueError(f"selective_scan (triton): d_state N={N} is above the supported 256")
    BN = triton.next_power_of_2(N)
    return min(triton.next_power_of_2(Dc), max(1, 2048 // BN), 16), BN


class _SelectiveScan(torch.autograd.Function):
    """(u, dt, A, B, C, h0, starts) -> (y_core (Bt, T, Dc), h_T (Bt, Dc, N)), both float32."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, starts):
        Bt, T, Dc = u.shape
        N = A.shape[1]
        BD, BN = _blocks(Dc, N)
        y = u.new_empty(Bt, T, Dc, dtype=torch.float32)
        hT = torch.empty_like(h0)
        ckpt = h0.new_empty(Bt, triton.cdiv(T, CHUNK), Dc, N)
        grid = (Bt, triton.cdiv(Dc, BD))
        _scan_fwd[grid](u, dt, A, B, C, starts, h0, y, hT, ckpt, T, Dc, N, L=CHUNK, BD=BD, BN=BN)
        ctx.save_for_backward(u, dt, A, B, C, starts, ckpt)
        ctx.mark_non_differentiable(starts)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, dt, A, B, C, starts, ckpt = ctx.saved_tensors
        Bt, T, Dc = u.shape
        N = A.shape[1]
        BD, BN = _blocks(Dc, N)
        grid = (Bt, triton.cdiv(Dc, BD))
        f32 = {"device": u.device, "dtype": torch.float32}
        dy = dy.contiguous() if dy is not None else torch.zeros(Bt, T, Dc, **f32)
        dhT = dhT.contiguous() if dhT is not None else torch.zeros(Bt, Dc, N, **f32)
        scratch = torch.empty(Bt, grid[1], CHUNK, BD, BN, **f32)
        du, ddt = torch.empty(Bt, T, Dc, **f32), torch.empty_like(dt)
        dA, dh0 = torch.empty(Bt, Dc, N, **f32), torch.empty(Bt, Dc, N, **f32)
        dB, dC = torch.empty(Bt, grid[1], T, N, **f32), torch.empty(Bt, grid[1], T, N, **f32)
        _scan_bwd[grid](u, dt, A, B, C, starts, ckpt, dy, dhT, scratch, du, ddt, dA, dB, dC, dh0, T, Dc, N,
                        L=CHUNK, BD=BD, BN=BN)
        return du.to(u.dtype), ddt, dA.sum(0), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype), dh0, None


def _triton_core(u, dt, A, B, C, h0, starts):
    return _SelectiveScan.apply(
        u.contiguous(), dt.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(), h0.contiguous(),
        starts.to(torch.int32),
    )


def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, *,
    initial_state=None, doc_ids=None, return_final_state=False,
):
    """u, delta, z: (Bt, T, Dc) in bf16/fp16/fp32; A: (Dc, N), N <= 256; B, C: (Bt, T, N);
    D, delta_bias: (Dc,); initial_state: (Bt, Dc, N); doc_ids: (Bt, T).
    Returns y (Bt, T, Dc) in u's dtype [, final_state (Bt, Dc, N) float32]."""
    return selective_scan_from_core(
        _triton_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, doc_ids, return_final_state
    )
