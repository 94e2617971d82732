"""Mamba-2 SSD in Triton: the chunk scan (kernels in triton_fwd.py / triton_bwd.py) as an
autograd.Function; dt preprocessing, the chunk cumsum of dt*A, the D skip and the z gate stay in
PyTorch (elementwise, shared with chunked.py), so autograd carries the scan's gradients to A,
dt_bias, D and z. States are float32; x, B, C may be float32, float16 or bfloat16.
"""

from __future__ import annotations

import torch
import triton

from undertow.kernels.dispatch import triton_runs_on
from undertow.kernels.ssd.chunked import (
    check_inputs,
    chunk_decays,
    chunk_segments,
    finish,
)
from undertow.kernels.ssd.reference import ssd_dt
from undertow.kernels.ssd.triton_bwd import (
    chunk_scan_bwd_source_kernel,
    chunk_scan_bwd_target_kernel,
    state_pass_bwd_kernel,
)
from undertow.kernels.ssd.triton_fwd import (
    chunk_outer_kernel,
    chunk_scan_fwd_kernel,
    state_pass_fwd_kernel,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _blocks(L: int, P: int, N: int, dtype: torch.dtype) -> dict:
    """Tile sizes: a whole head (P) and state (N) per program, tl.dot sides >= 16, and token tiles that
    shrink as the (P, N) tile grows so the backward kernels stay inside Hopper's 227 KiB of shared
    memory. Largest use per kernel in sm_90 compiles (Triton 3.9): bf16 P=64 N=256 / 64 tokens 192 KiB,
    bf16 P=128 N=256 / 32 tokens 224 KiB, float32 P=64 N=128 / 64 tokens 161 KiB, P=128 N=256 / 16 tokens 160 KiB."""
    block_p, block_n = max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))
    tile_bytes = block_p * block_n * (4 if dtype == torch.float32 else 2)
    block_m = 64 if tile_bytes <= 32 * 1024 else 32 if tile_bytes <= 64 * 1024 else 16
    block_m = min(block_m, max(16, triton.next_power_of_2(L)))
    return {"BLOCK_M": block_m, "BLOCK_K": block_m, "BLOCK_P": block_p, "BLOCK_N": block_n}


class _ChunkScan(torch.autograd.Function):
    """(x, step, a, B, C, initial_state) -> (y float32 (Bt, T, H, P), final_state (Bt, H, P, N)).
    x: (Bt, T, H, P); step: (Bt, T, H) float32; a: (Bt, H, nc*L) float32 chunk cumsums of step*A;
    B, C: (Bt, T, G, N); initial_state: (Bt, H, P, N) or None; seg: (Bt, nc*L) int32 segment numbers;
    ends: (nc,) index of each chunk's last token."""

    @staticmethod
    def forward(ctx, x, step, a, B, C, initial_state, seg, ends, chunk):
        Bt, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        Tp = a.shape[-1]
        nc = Tp // chunk
        exact = x.dtype == torch.float32
        blk = _blocks(chunk, P, N, x.dtype)
        dims = {"T": T, "Tp": Tp, "H": H}
        f32 = {"device": x.device, "dtype": torch.float32}

        chunk_states = torch.empty(Bt, nc, H, P, N, **f32)
        chunk_outer_kernel[(nc, Bt * H, triton.cdiv(P, blk["BLOCK_P"]))](
            x, step, a, seg, B, chunk_states, **dims, G=G, P=P, N=N, nc=nc, FROM_END=True, L=chunk,
            BLOCK_L=blk["BLOCK_M"], BLOCK_P=blk["BLOCK_P"], BLOCK_N=blk["BLOCK_N"], EXACT=exact)
        states = torch.empty(Bt, nc + 1, H, P, N, **f32)
        block = min(1024, triton.next_power_of_2(P * N))
        init = initial_state.float().contiguous() if initial_state is not None else chunk_states
        state_pass_fwd_kernel[(Bt * H, triton.cdiv(P * N, block))](
            chunk_states, init, a, seg, states, **dims, PN=P * N, nc=nc,
            HAS_INIT=initial_state is not None, L=chunk, BLOCK=block)
        y = torch.empty(Bt, T, H, P, **f32)
        chunk_scan_fwd_kernel[(nc * triton.cdiv(chunk, blk["BLOCK_M"]), Bt * H, triton.cdiv(P, blk["BLOCK_P"]))](
            x, step, a, seg, B, C, states, y, **dims, G=G, P=P, N=N, nc=nc, L=chunk, **blk, EXACT=exact)

        ctx.save_for_backward(x, step, a, B, C, seg, ends, states)
        ctx.chunk, ctx.has_init, ctx.init_dtype = chunk, initial_state is not None, getattr(initial_state, "dtype", None)
        return y, states[:, nc].clone()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, step, a, B, C, seg, ends, states = ctx.saved_tensors
        chunk = ctx.chunk
        Bt, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        Tp = a.shape[-1]
        nc = Tp // chunk
        exact = x.dtype == torch.float32
        blk = _blocks(chunk, P, N, x.dtype)
        dims = {"T": T, "Tp": Tp, "H": H}
        f32 = {"device": x.device, "dtype": torch.float32}
        dy, dfinal = dy.float().contiguous(), dfinal.float().contiguous()  # autograd materializes unused ones as zeros

        ds = torch.empty(Bt, nc, H, P, N, **f32)
        chunk_outer_kernel[(nc, Bt * H, triton.cdiv(P, blk["BLOCK_P"]))](
            dy, step, a, seg, C, ds, **dims, G=G, P=P, N=N, nc=nc, FROM_END=False, L=chunk,
            BLOCK_L=blk["BLOCK_M"], BLOCK_P=blk["BLOCK_P"], BLOCK_N=blk["BLOCK_N"], EXACT=exact)
        block = min(1024, triton.next_power_of_2(P * N))
        n_blocks = triton.cdiv(P * N, block)
        dend = torch.empty(Bt * H, nc, n_blocks, **f32)
        dinit = torch.empty(Bt, H, P, N, **f32)
        state_pass_bwd_kernel[(Bt * H, n_blocks)](
            ds, dfinal, a, seg, states, dend, dinit, **dims, PN=P * N, nc=nc, L=chunk, BLOCK=block)

        grid = (nc * triton.cdiv(chunk, blk["BLOCK_M"]), Bt * H)
        dc = torch.empty(Bt, T, H, N, **f32)
        da = torch.zeros(Bt, H, Tp, **f32)
        chunk_scan_bwd_target_kernel[grid](
            dy, x, step, a, seg, B, C, states, dc, da, **dims, G=G, P=P, N=N, nc=nc, L=chunk, **blk, EXACT=exact)
        dx = torch.empty(Bt, T, H, P, **f32)
        dstep = torch.empty(Bt, T, H, **f32)
        db = torch.empty(Bt, T, H, N, **f32)
        chunk_scan_bwd_source_kernel[grid](
            dy, x, step, a, seg, B, C, ds, dx, dstep, db, da, **dims, G=G, P=P, N=N, nc=nc, L=chunk, **blk,
            EXACT=exact)

        da[:, :, ends] += dend.sum(-1).view(Bt, H, nc)
        dB = db.view(Bt, T, G, H // G, N).sum(3).to(B.dtype)
        dC = dc.view(Bt, T, G, H // G, N).sum(3).to(C.dtype)
        dinit = dinit.to(ctx.init_dtype) if ctx.has_init else None
        return dx.to(x.dtype), dstep, da, dB, dC, dinit, None, None, None


def ssd_triton(
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
    if not triton_runs_on(x):
        raise RuntimeError(f"ssd triton: cannot run on {x.device} tensors (needs CUDA, or TRITON_INTERPRET=1 "
                           "set before undertow.kernels.ssd.triton is imported)")
    if x.dtype not in DTYPES or B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"ssd triton: x, B, C must share one of {DTYPES}; got {x.dtype}, {B.dtype}, {C.dtype}")
    Bt, T = x.shape[:2]
    step = ssd_dt(dt, dt_bias, dt_softplus, dt_limit)
    a = chunk_decays(step, A, chunk_size).contiguous()
    seg, _, ends = chunk_segments(doc_ids, Bt, T, chunk_size, x.device)
    y, final = _ChunkScan.apply(x.contiguous(), step.contiguous(), a, B.contiguous(), C.contiguous(),
                                initial_state, seg.contiguous(), ends, chunk_size)
    y = finish(y, x, D, z)
    return (y, final) if return_final_state else y
