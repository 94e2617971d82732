"""The "triton" grouped GEMM of the MoE experts: y[rows of group g] = xs[rows of group g] @ w[g], with
the contract of grouped.py's other GEMMs (xs (M, K) sorted by expert, w (E, K, N), offsets (E,) int32
the cumulative group ends; empty groups allowed). Forward and backward (an autograd.Function):

    y   = _rows_mm(xs, w)             row tiles inside one group each, N tiles
    dxs = _rows_mm(dy, w^T)           the same kernel on w.transpose(1, 2) (strides, no copy)
    dw  = _weight_mm(xs, dy)          dw[g] = xs_g^T dy_g; zero for an empty group

The row-tile map (which group and first row each tile has) is computed from the offsets with torch ops
on the device, so nothing waits on the host: the grid is the upper bound cdiv(M, BM) + E tiles and the
spare ones exit at once. A tile never straddles two experts. Kernels: triton_grouped_kernels.py.
"""

from __future__ import annotations

import torch

from undertow.kernels.moe import triton_grouped_kernels as kernels

# Tiles (rows, N, K) and warps per dtype size in bytes; untuned on a GPU (scripts/moe_sm90_compile.py
# reports registers and spills for sm_90). BN/BK shrink to the problem (>= 16, tl.dot's smallest side).
ROWS_MM = {2: dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
           4: dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=3)}
WEIGHT_MM = {2: dict(BM=64, BN=128, BK=128, num_warps=8, num_stages=3),
             4: dict(BM=32, BN=64, BK=64, num_warps=4, num_stages=3)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fit(blocks: dict, K: int, N: int) -> dict:
    """blocks with BK/BN no wider than the next power of two of K/N (and at least 16)."""
    import triton

    fit = lambda b, n: max(16, min(b, triton.next_power_of_2(n)))  # noqa: E731
    return {**blocks, "BK": fit(blocks["BK"], K), "BN": fit(blocks["BN"], N)}


def _precision(dtype: torch.dtype) -> str:
    """float32 operands: exact unless torch's own float32 matmuls are allowed tf32; half: ignored."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def tile_map(offsets: torch.Tensor, M: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """offsets (E,) int32 group ends -> (group, first row) of each row tile, (min(cdiv(M, BM) + E, M),)
    int32 each (an upper bound on the tiles), group -1 for the spare tiles past the last real one. On
    offsets' device, no host sync."""
    E = offsets.shape[0]
    ends = offsets.long()
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    tiles = (ends - starts + BM - 1) // BM  # row tiles of each group
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(min(-(-M // BM) + E, M), device=offsets.device)
    group = torch.searchsorted(tile_end, t, right=True)  # the first group whose tiles end after t
    g = group.clamp(max=E - 1)
    row = starts[g] + (t - (tile_end - tiles)[g]) * BM
    return torch.where(group < E, group, -1).to(torch.int32), row.to(torch.int32)


def rows_mm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """xs (M, K), w (E, K, N) (any strides), offsets[-1] == M -> (M, N) in xs's dtype."""
    M, K = xs.shape
    N = w.shape[2]
    if M == 0 or N == 0 or K == 0 or offsets.shape[0] == 0:
        return xs.new_zeros(M, N)
    y = xs.new_empty(M, N)
    cfg = _fit(ROWS_MM[xs.element_size()], K, N)
    group, row = tile_map(offsets, M, cfg["BM"])
    import triton

    grid = (group.shape[0], triton.cdiv(N, cfg["BN"]))
    kernels._rows_mm[grid](xs, w, y, group, row, offsets, N, K, *xs.stride(), *w.stride(), *y.stride(),
                           PRECISION=_precision(xs.dtype), **cfg)
    return y


def weight_mm(xs: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """xs (M, K), dy (M, N) -> dw (E, K, N) in xs's dtype, dw[g] = xs_g^T dy_g (zero for empty groups)."""
    M, K = xs.shape
    N = dy.shape[1]
    E = offsets.shape[0]
    dw = xs.new_empty(E, K, N)
    if E == 0 or K == 0 or N == 0:
        return dw
    if M == 0:
        return dw.zero_()
    cfg = _fit(WEIGHT_MM[xs.element_size()], K, N)
    import triton

    grid = (E, triton.cdiv(K, cfg["BK"]), triton.cdiv(N, cfg["BN"]))
    kernels._weight_mm[grid](xs, dy, dw, offsets, N, K, *xs.stride(), *dy.stride(), *dw.stride(),
                             PRECISION=_precision(xs.dtype), **cfg)
    return dw


class GroupedMM(torch.autograd.Function):
    """y = grouped xs @ w[g]; gradients for xs and w (offsets are integers)."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(xs, w, offsets)
        return rows_mm(xs, w, offsets)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xs, w, offsets = ctx.saved_tensors
        dy = dy.to(xs.dtype)
        dxs = rows_mm(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        dw = weight_mm(xs, dy, offsets) if ctx.needs_input_grad[1] else None
        return dxs, dw, None


def grouped_mm_triton(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """xs (M, K) rows sorted by group, w (E, K, N), offsets (E,) int32 cumulative group ends (the last
    equal to M) -> (M, N), differentiable in xs and w. xs and w share a dtype in DTYPES and a device."""
    if xs.dtype != w.dtype or xs.dtype not in DTYPES:
        raise TypeError(f"triton grouped GEMM: xs and w must share one of {DTYPES}, got {xs.dtype} and {w.dtype}")
    if xs.shape[1] != w.shape[1] or offsets.shape != (w.shape[0],):
        raise ValueError(f"triton grouped GEMM: xs {tuple(xs.shape)}, w {tuple(w.shape)} and offsets "
                         f"{tuple(offsets.shape)} do not fit (M, K), (E, K, N), (E,)")
    return GroupedMM.apply(xs, w, offsets.to(torch.int32))
