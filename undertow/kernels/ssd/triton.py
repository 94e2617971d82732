"""Mamba-2 SSD in Triton: the chunk scan with the D skip fused (kernels in triton_fwd.py /
triton_bwd.py) as an autograd.Function. One prologue kernel computes step = softplus(dt + dt_bias)
clamped and the chunk cumsums of step * A (and its backward kernel the gradients of dt, A and dt_bias,
with the outgoing-state term of each chunk's last token folded in); only the z gate stays in PyTorch.
States are float32; x, B, C may be float32, float16 or bfloat16. Without z, y is written once by the
scan kernel in x's dtype. See docs/ssd_kernel_notes.md for the costs and the floors.

Three knobs for the GPU, read at every call (scripts/bench_ssd.py gpu --sweep times them):
  UNDERTOW_SSD_DOT    16-bit inputs: "tf32" (default: derived operands of the matrix products in
                      tf32), "input" (rounded to the inputs' bf16/fp16: the tensor cores' full rate)
                      or "forward" (rounded in the forward kernels, tf32 in the backward ones)
  UNDERTOW_SSD_TILES  e.g. "m=64,warps=4,stages=2,heads=8": token tile of the scan kernels, num_warps /
                      num_stages of every matrix kernel (Triton's defaults when absent), and the most
                      heads of one group a backward scan program takes (the largest divisor of H / G
                      up to `heads`, default 1); `bwarps` sets num_warps of the backward scan
                      kernels alone (they hold the most accumulators)
  UNDERTOW_SSD_BWD    "split" (default: three backward scan kernels for dC, dx and dB, one accumulator
                      each, no register spills in sm_90 compiles) or "fused" (two kernels, the source
                      one holding dx's and dB's accumulators: it spills)
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

from undertow.kernels.dispatch import triton_runs_on
from undertow.kernels.ssd.chunked import (
    check_inputs,
    chunk_segments,
    finish,
)
from undertow.kernels.ssd.triton_bwd import (
    chunk_scan_bwd_source_kernel,
    chunk_scan_bwd_target_kernel,
    dt_prep_bwd_kernel,
    scan_bwd_db_kernel,
    scan_bwd_dc_kernel,
    scan_bwd_dx_kernel,
    state_pass_bwd_kernel,
)
from undertow.kernels.ssd.triton_fwd import (
    chunk_outer_kernel,
    chunk_scan_fwd_kernel,
    dt_prep_kernel,
    state_pass_fwd_kernel,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOT_ENV, TILES_ENV, BWD_ENV = "UNDERTOW_SSD_DOT", "UNDERTOW_SSD_TILES", "UNDERTOW_SSD_BWD"
TILE_KEYS = ("m", "warps", "stages", "heads", "bwarps")
# Backward scan programs: heads of one group per program, their dB / dC summed in registers. 1 by
# default: compiled for sm_90 (Triton 3.9, 4 warps, bf16, P=64, N=128) the loop over heads raises the
# source kernel's shared memory from 88 to 120 KiB (one program per SM instead of two) and both
# kernels' register spills ~2x (docs/ssd_kernel_notes.md); `heads=8` is swept on the GPU.
HEADS_PER_PROGRAM = 1
DOT_CHOICES = ("tf32", "input", "forward")
BWD_CHOICES = ("split", "fused")


def _backward_form() -> str:
    """UNDERTOW_SSD_BWD: "split" (default: dC, dx and dB scan kernels, one accumulator each) or "fused"
    (the earlier target / source pair, two or three accumulators a program)."""
    choice = os.environ.get(BWD_ENV, "split")
    if choice not in BWD_CHOICES:
        raise ValueError(f"{BWD_ENV}={choice!r}: choose one of {BWD_CHOICES}")
    return choice


@functools.cache
def _tiles(spec: str) -> dict:
    """UNDERTOW_SSD_TILES "m=64,warps=4,stages=2" -> {"m": 64, "warps": 4, "stages": 2}."""
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in TILE_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{TILES_ENV}={spec!r}: {item!r} is not one of {TILE_KEYS} = a positive int")
        out[key] = int(value)
    if "m" in out and (out["m"] < 16 or out["m"] & (out["m"] - 1)):
        raise ValueError(f"{TILES_ENV}={spec!r}: m must be a power of two >= 16")
    return out


def _precision(dtype: torch.dtype, backward: bool) -> int:
    """PREC of the forward or backward kernels (see triton_fwd.mm): 0 exact for float32 inputs;
    16-bit inputs: 1 tf32, 2/3 operands rounded to bf16/fp16 ("input" everywhere, "forward" in the
    forward kernels only: A's gradient sums many products whose rounding does not cancel)."""
    if dtype == torch.float32:
        return 0
    choice = os.environ.get(DOT_ENV, "tf32")
    if choice not in DOT_CHOICES:
        raise ValueError(f"{DOT_ENV}={choice!r}: choose one of {DOT_CHOICES}")
    if choice == "tf32" or (choice == "forward" and backward):
        return 1
    return 2 if dtype == torch.bfloat16 else 3


def _launch(backward_scan: bool = False) -> dict:
    """num_warps / num_stages of the matrix kernels from UNDERTOW_SSD_TILES (empty: Triton's defaults);
    the backward scan kernels take `bwarps` over `warps` when it is given."""
    tiles = _tiles(os.environ.get(TILES_ENV, ""))
    names = {"warps": "num_warps", "stages": "num_stages"}
    out = {names[k]: v for k, v in tiles.items() if k in names}
    if backward_scan and "bwarps" in tiles:
        out["num_warps"] = tiles["bwarps"]
    return out


def _heads_per_program(H: int, G: int) -> int:
    """Heads per backward scan program: the largest divisor of H // G up to the "heads" tile (default 1)."""
    limit = _tiles(os.environ.get(TILES_ENV, "")).get("heads", HEADS_PER_PROGRAM)
    return max(d for d in range(1, min(limit, H // G) + 1) if (H // G) % d == 0)


def _group_sum(partial: torch.Tensor, G: int, dtype: torch.dtype) -> torch.Tensor:
    """(Bt, T, HB, N) float32 partial sums over blocks of heads (HB a multiple of G) -> (Bt, T, G, N)."""
    Bt, T, HB, N = partial.shape
    if HB != G:
        partial = partial.view(Bt, T, G, HB // G, N).sum(3)
    return partial.to(dtype)


def _blocks(L: int, P: int, N: int, dtype: torch.dtype) -> dict:
    """Tile sizes: a whole head (P) and state (N) per program, tl.dot sides >= 16, and token tiles that
    shrink as the (P, N) tile grows so the backward kernels stay inside Hopper's 227 KiB of shared
    memory. Largest use per kernel in sm_90 compiles (Triton 3.9): bf16 P=64 N=256 / 64 tokens 192 KiB,
    bf16 P=128 N=256 / 32 tokens 224 KiB, float32 P=64 N=128 / 64 tokens 161 KiB, P=128 N=256 / 16 tokens 160 KiB."""
    block_p, block_n = max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))
    tile_bytes = block_p * block_n * (4 if dtype == torch.float32 else 2)
    block_m = 64 if tile_bytes <= 32 * 1024 else 32 if tile_bytes <= 64 * 1024 else 16
    block_m = _tiles(os.environ.get(TILES_ENV, "")).get("m", block_m)
    block_m = min(block_m, max(16, triton.next_power_of_2(L)))
    return {"BLOCK_M": block_m, "BLOCK_K": block_m, "BLOCK_P": block_p, "BLOCK_N": block_n}


def _dt_args(dt_bias, dt_softplus: bool, dt_limit: tuple[float, float]) -> dict:
    """Arguments of the dt prologue kernels (triton_fwd.dt_prep_kernel and its backward)."""
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return {"lo": lo, "hi": hi, "HAS_BIAS": dt_bias is not None, "SOFTPLUS": bool(dt_softplus),
            "HAS_LIMIT": (lo, hi) != (0.0, float("inf"))}


DT_BLOCK_H = 16  # heads per program of the dt prologue kernels (8 warps: no register spills at L=256)


class _ChunkScan(torch.autograd.Function):
    """(x, dt, A, dt_bias, B, C, D, initial_state) -> (y (Bt, T, H, P) in out_dtype, final_state (Bt, H, P, N)).
    x: (Bt, T, H, P); dt: (Bt, T, H) raw (softplus(dt + dt_bias) clamped to dt_limit, as reference.ssd_dt,
    is computed with the chunk cumsums of step * A by one kernel); A, dt_bias: (H,); B, C: (Bt, T, G, N);
    D: (H,) or (H, P) or None (y += D x); initial_state: (Bt, H, P, N) or None; seg: (Bt, nc*L) int32
    segment numbers."""

    @staticmethod
    def forward(ctx, x, dt, A, dt_bias, B, C, D, initial_state, seg, chunk, out_dtype, dt_softplus, dt_limit):
        Bt, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        Tp = seg.shape[-1]
        nc = Tp // chunk
        f32 = {"device": x.device, "dtype": torch.float32}
        A32 = A.float().contiguous()
        bias = dt_bias.contiguous() if dt_bias is not None else A32  # a placeholder pointer without a bias
        dt_args = _dt_args(dt_bias, dt_softplus, dt_limit)
        step, a = torch.empty(Bt, T, H, **f32), torch.empty(Bt, H, Tp, **f32)
        dt_grid = (Bt * nc, triton.cdiv(H, DT_BLOCK_H))
        dt_prep_kernel[dt_grid](dt, bias, A32, step, a, T, Tp, H, nc, **dt_args, L=chunk,
                                BLOCK_L=max(16, triton.next_power_of_2(chunk)), BLOCK_H=DT_BLOCK_H, num_warps=8)
        prec, launch = _precision(x.dtype, backward=False), _launch()
        blk = _blocks(chunk, P, N, x.dtype)
        dims = {"T": T, "Tp": Tp, "H": H}
        Dv = D.float().contiguous() if D is not None else step  # a placeholder pointer without D
        skip = {"HAS_D": D is not None, "D_PER_P": D is not None and D.ndim == 2}

        chunk_states = torch.empty(Bt, nc, H, P, N, **f32)
        chunk_outer_kernel[(nc, Bt * H, triton.cdiv(P, blk["BLOCK_P"]))](
            x, step, a, seg, B, chunk_states, **dims, G=G, P=P, N=N, nc=nc, FROM_END=True, L=chunk,
            BLOCK_L=blk["BLOCK_M"], BLOCK_P=blk["BLOCK_P"], BLOCK_N=blk["BLOCK_N"], PREC=prec, **launch)
        states = torch.empty(Bt, nc + 1, H, P, N, **f32)
        block = min(1024, triton.next_power_of_2(P * N))
        init = initial_state.float().contiguous() if initial_state is not None else chunk_states
        state_pass_fwd_kernel[(Bt * H, triton.cdiv(P * N, block))](
            chunk_states, init, a, seg, states, **dims, PN=P * N, nc=nc,
            HAS_INIT=initial_state is not None, L=chunk, BLOCK=block)
        y = torch.empty(Bt, T, H, P, device=x.device, dtype=out_dtype)
        chunk_scan_fwd_kernel[(nc * triton.cdiv(chunk, blk["BLOCK_M"]), Bt * H, triton.cdiv(P, blk["BLOCK_P"]))](
            x, step, a, seg, B, C, states, Dv, y, **dims, G=G, P=P, N=N, nc=nc, L=chunk, **blk, PREC=prec,
            **skip, **launch)

        ctx.save_for_backward(x, dt, A32, dt_bias, step, a, B, C, D, seg, states)
        ctx.chunk, ctx.has_init, ctx.init_dtype = chunk, initial_state is not None, getattr(initial_state, "dtype", None)
        ctx.dt_args, ctx.A_dtype = dt_args, A.dtype
        return y, states[:, nc].clone()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A32, dt_bias, step, a, B, C, D, seg, states = ctx.saved_tensors
        chunk = ctx.chunk
        Bt, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        Tp = a.shape[-1]
        nc = Tp // chunk
        prec, launch = _precision(x.dtype, backward=True), _launch()
        blk = _blocks(chunk, P, N, x.dtype)
        dims = {"T": T, "Tp": Tp, "H": H}
        f32 = {"device": x.device, "dtype": torch.float32}
        # autograd materializes unused outputs' gradients as zeros; dy is read in its own dtype
        dy, dfinal = dy.contiguous(), dfinal.float().contiguous()
        Dv = D.float().contiguous() if D is not None else step
        skip = {"HAS_D": D is not None, "D_PER_P": D is not None and D.ndim == 2}

        ds = torch.empty(Bt, nc, H, P, N, **f32)
        chunk_outer_kernel[(nc, Bt * H, triton.cdiv(P, blk["BLOCK_P"]))](
            dy, step, a, seg, C, ds, **dims, G=G, P=P, N=N, nc=nc, FROM_END=False, L=chunk,
            BLOCK_L=blk["BLOCK_M"], BLOCK_P=blk["BLOCK_P"], BLOCK_N=blk["BLOCK_N"], PREC=prec, **launch)
        block = min(1024, triton.next_power_of_2(P * N))
        n_blocks = triton.cdiv(P * N, block)
        dend = torch.empty(Bt * H, nc, n_blocks, **f32)
        dinit = torch.empty(Bt, H, P, N, **f32)
        split = _backward_form() == "split"
        state_pass_bwd_kernel[(Bt * H, n_blocks)](
            ds, dfinal, a, seg, states, dend, dinit, **dims, PN=P * N, nc=nc, L=chunk, BLOCK=block, CARRY_ONLY=split)

        hp = _heads_per_program(H, G)
        grid = (nc * triton.cdiv(chunk, blk["BLOCK_M"]), Bt * (H // hp))
        dc = torch.empty(Bt, T, H // hp, N, **f32)
        da = torch.empty(Bt, H, Tp, **f32)  # written at every t < T by the target / dC kernel; never read past T
        dx = torch.empty_like(x)
        dstep = torch.empty(Bt, T, H, **f32)
        db = torch.empty(Bt, T, H // hp, N, **f32)
        dd = torch.empty(Bt * H, grid[0], P, **f32) if D is not None else dstep
        scan = {**dims, "G": G, "P": P, "N": N, "nc": nc, "L": chunk, **blk, "PREC": prec,
                **_launch(backward_scan=True)}
        raw = dy.dtype == x.dtype
        dw = torch.empty(Bt, H, Tp, **f32) if split else da  # the outgoing-state terms of dA (split)
        if split:
            scan_bwd_dc_kernel[grid](dy, x, step, a, seg, B, C, states, dc, da, HP=hp, **scan, DY_RAW=raw)
            scan_bwd_dx_kernel[(grid[0], Bt * H)](dy, x, step, a, seg, B, C, ds, Dv, dx, dstep, da, dw, dd, **scan,
                                                  **skip)
            scan_bwd_db_kernel[grid](dy, x, step, a, seg, C, ds, db, HP=hp, **scan, DY_RAW=raw)
        else:
            chunk_scan_bwd_target_kernel[grid](dy, x, step, a, seg, B, C, states, dc, da, HP=hp, **scan, DY_RAW=raw)
            chunk_scan_bwd_source_kernel[grid](dy, x, step, a, seg, B, C, ds, Dv, dx, dstep, db, da, dd, HP=hp,
                                               **scan, **skip, DY_RAW=raw)

        ddt = torch.empty_like(dt)
        dA_part = torch.empty(Bt * nc, H, **f32)
        dbias_part = torch.empty(Bt * nc, H, **f32) if dt_bias is not None else dA_part
        dt_prep_bwd_kernel[(Bt * nc, triton.cdiv(H, DT_BLOCK_H))](
            dt, dt_bias.contiguous() if dt_bias is not None else A32, A32, dstep, da, dend, dw, ddt, dA_part, dbias_part,
            T, Tp, H, nc, n_blocks, **ctx.dt_args, L=chunk, BLOCK_L=max(16, triton.next_power_of_2(chunk)),
            BLOCK_H=DT_BLOCK_H, BLOCK_NB=max(2, triton.next_power_of_2(n_blocks)), HAS_W=split, num_warps=8)
        dA = dA_part.sum(0).to(ctx.A_dtype)
        dbias = dbias_part.sum(0).to(dt_bias.dtype) if dt_bias is not None else None
        dB = _group_sum(db, G, B.dtype)
        dC = _group_sum(dc, G, C.dtype)
        dD = None
        if D is not None:
            dD = dd.view(Bt, H, grid[0], P).sum((0, 2))
            dD = (dD if D.ndim == 2 else dD.sum(-1)).to(D.dtype)
        dinit = dinit.to(ctx.init_dtype) if ctx.has_init else None
        return dx, ddt, dA, dbias, dB, dC, dD, dinit, None, None, None, None, None


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
    Tp = math.ceil(T / chunk_size) * chunk_size
    if doc_ids is None:  # one segment a row
        seg = torch.zeros(Bt, Tp, dtype=torch.int32, device=x.device)
    else:
        seg = chunk_segments(doc_ids, Bt, T, chunk_size, x.device)[0].contiguous()
    out_dtype = x.dtype if z is None else torch.float32  # the gate multiplies the float32 scan output
    y, final = _ChunkScan.apply(x.contiguous(), dt.contiguous(), A, dt_bias, B.contiguous(), C.contiguous(), D,
                                initial_state, seg, chunk_size, out_dtype, dt_softplus, tuple(dt_limit))
    if z is not None:
        y = finish(y, x, None, z)
    return (y, final) if return_final_state else y
