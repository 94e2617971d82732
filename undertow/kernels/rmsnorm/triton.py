"""RMSNorm (optionally gated and grouped) in Triton: one forward and one backward kernel, as an
autograd.Function that saves only the inputs and the float32 1/rms per group (see chunked.py for the
gradient formulas, which these kernels compute).

A row of `dim` channels is held as a (BLOCK_G, BLOCK_S) tile: one line per group of `group_size`
channels (both sides padded to powers of two and masked), so a per-group mean is a reduction over
axis 1 and a plain RMSNorm is the one-group case. Forward: one program per ROWS rows. Backward: each
program walks a contiguous block of rows and keeps its partial weight gradient in registers; the
partial sums (programs, dim) are added up in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from undertow.kernels.dispatch import triton_runs_on
from undertow.kernels.rmsnorm.reference import check_inputs

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tile(GROUPS, group, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Column index (BLOCK_G, BLOCK_S) of each tile element and whether it is a real channel."""
    gi = tl.arange(0, BLOCK_G)[:, None]
    si = tl.arange(0, BLOCK_S)[None, :]
    return gi * group + si, (gi < GROUPS) & (si < group)


@triton.jit
def _rmsnorm_fwd_kernel(
    X, Z, W, OUT, RSTD, R, stride_x, stride_z, stride_o, GROUPS, group, eps,
    HAS_Z: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """OUT[r] = W * g / rms_group(g) with g = X[r] * silu(Z[r]) (or X[r]); RSTD[r, group] = 1/rms."""
    col, live = _tile(GROUPS, group, BLOCK_G, BLOCK_S)
    w = tl.load(W + col, mask=live, other=0.0).to(tl.float32)
    gidx = tl.arange(0, BLOCK_G)
    for i in range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        ok = live & (col * 0 + row < R)  # a tensor compare: the interpreter rejects scalar & tensor masks
        g = tl.load(X + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(Z + row * stride_z + col, mask=ok, other=0.0).to(tl.float32)
            g = g * z * tl.sigmoid(z)
        rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=1) / group + eps)  # (BLOCK_G,)
        out = g * rstd[:, None] * w
        tl.store(OUT + row * stride_o + col, out.to(OUT.dtype.element_ty), mask=ok)
        tl.store(RSTD + row * GROUPS + gidx, rstd, mask=(gidx < GROUPS) & (gidx * 0 + row < R))


@triton.jit
def _rmsnorm_bwd_kernel(
    X, Z, W, DOUT, RSTD, DX, DZ, DW, R, rows_per_program, stride_x, stride_z, stride_d, dim, GROUPS, group,
    HAS_Z: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """DX, DZ (contiguous, the inputs' dtypes) of rows [pid * rows_per_program, ...); DW[pid] = this
    program's partial sum of dout * ĝ (float32)."""
    pid = tl.program_id(0)
    col, live = _tile(GROUPS, group, BLOCK_G, BLOCK_S)
    w = tl.load(W + col, mask=live, other=0.0).to(tl.float32)
    gidx = tl.arange(0, BLOCK_G)
    dw = tl.zeros((BLOCK_G, BLOCK_S), dtype=tl.float32)
    for i in range(rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        ok = live & (col * 0 + row < R)  # a tensor compare: the interpreter rejects scalar & tensor masks
        x = tl.load(X + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(DOUT + row * stride_d + col, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row * GROUPS + gidx, mask=(gidx < GROUPS) & (gidx * 0 + row < R), other=0.0)[:, None]
        if HAS_Z:
            z = tl.load(Z + row * stride_z + col, mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            g = x * z * sig
        else:
            g = x
        g_hat = g * rstd
        dw += d * g_hat
        dg_hat = d * w
        dg = rstd * (dg_hat - g_hat * (tl.sum(dg_hat * g_hat, axis=1) / group)[:, None])
        if HAS_Z:
            tl.store(DX + row * dim + col, (dg * z * sig).to(DX.dtype.element_ty), mask=ok)
            tl.store(DZ + row * dim + col, (dg * x * sig * (1 + z * (1 - sig))).to(DZ.dtype.element_ty), mask=ok)
        else:
            tl.store(DX + row * dim + col, dg.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW + pid * dim + col, dw, mask=live)


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., dim) -> (R, dim) with unit stride along dim (a view when the layout allows)."""
    t2 = t.reshape(-1, dim)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(dim: int, group: int) -> dict:
    block_g, block_s = triton.next_power_of_2(dim // group), triton.next_power_of_2(group)
    tile = block_g * block_s
    return {"BLOCK_G": block_g, "BLOCK_S": block_s, "num_warps": min(16, max(1, tile // 512))}


def _programs(R: int, device: torch.device) -> int:
    """Backward programs: a few per SM on a GPU (each keeps a weight-gradient tile), few in the interpreter."""
    if device.type == "cuda":
        return max(1, min(R, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(R, 4))


class _RMSNormTriton(torch.autograd.Function):
    """(x, z or None, weight, group, eps, out_dtype) -> out (..., dim) in out_dtype."""

    @staticmethod
    def forward(ctx, x, z, weight, group, eps, out_dtype):
        dim = x.shape[-1]
        x2 = _rows(x, dim)
        z2 = _rows(z, dim) if z is not None else x2
        R, groups = x2.shape[0], dim // group
        out = torch.empty(R, dim, dtype=out_dtype, device=x.device)
        rstd = torch.empty(R, groups, dtype=torch.float32, device=x.device)
        launch = _launch(dim, group)
        rows = 4 if launch["BLOCK_G"] * launch["BLOCK_S"] <= 1024 else 1
        if R > 0:
            _rmsnorm_fwd_kernel[(triton.cdiv(R, rows),)](
                x2, z2, weight, out, rstd, R, x2.stride(0), z2.stride(0), out.stride(0), groups, group, eps,
                HAS_Z=z is not None, ROWS=rows, **launch)
        ctx.save_for_backward(x2, z2 if z is not None else None, weight, rstd)
        ctx.group, ctx.shape = group, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, z2, weight, rstd = ctx.saved_tensors
        R, dim = x2.shape
        group = ctx.group
        d2 = _rows(dout, dim)
        dx = torch.empty(R, dim, dtype=x2.dtype, device=x2.device)
        dz = torch.empty(R, dim, dtype=z2.dtype, device=x2.device) if z2 is not None else dx
        programs = _programs(R, x2.device)
        per_program = triton.cdiv(R, programs) if R else 0
        dw = torch.zeros(programs, dim, dtype=torch.float32, device=x2.device)
        if R > 0:
            zz = z2 if z2 is not None else x2
            _rmsnorm_bwd_kernel[(programs,)](
                x2, zz, weight, d2, rstd, dx, dz, dw, R, per_program, x2.stride(0), zz.stride(0), d2.stride(0),
                dim, dim // group, group, HAS_Z=z2 is not None, **_launch(dim, group))
        dz = dz.view(ctx.shape) if z2 is not None else None
        return dx.view(ctx.shape), dz, dw.sum(0).to(weight.dtype), None, None, None


def rmsnorm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same signature and results as `rmsnorm_reference` (see reference.py)."""
    group = check_inputs(x, weight, z, group_size)
    if not triton_runs_on(x):
        raise RuntimeError(f"rmsnorm triton: cannot run on {x.device} tensors (needs CUDA, or TRITON_INTERPRET=1 "
                           "set before undertow.kernels.rmsnorm.triton is imported)")
    if x.dtype not in DTYPES or (z is not None and z.dtype not in DTYPES):
        raise ValueError(f"rmsnorm triton: x and z must be one of {DTYPES}; got {x.dtype}, {getattr(z, 'dtype', None)}")
    return _RMSNormTriton.apply(x, z, weight, group, eps, out_dtype or x.dtype)
