"""The two Triton kernels of the grouped GEMM (triton_grouped.py launches them).

    _rows_mm:   Y[rows of tile] = X[rows of tile] @ W[g]      one program per (row tile, N tile);
                a row tile lies inside one group g (the tile map, built on the host side in torch)
    _weight_mm: DW[g] = X[rows of g]^T @ DY[rows of g]        one program per (group, K tile, N tile),
                looping over the group's rows; an empty group stores zeros

Strides are arguments, so W may be a transposed view (the backward's dX = dY @ W[g]^T runs _rows_mm
on W.transpose(1, 2)). Products accumulate in float32: float32 operands exactly ("ieee") or in tf32
(PRECISION, as torch.backends.cuda.matmul.allow_tf32 says for torch's own float32 matmuls); bf16/fp16
operands go to tl.dot in their own type.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows_mm(X, W, Y, TILE_GROUP, TILE_ROW, OFFS, N, K,
             sxm, sxk, swe, swk, swn, sym, syn,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """X (M, K), W (E, K, N), Y (M, N); TILE_GROUP/TILE_ROW (tiles,) int32: the group of each row tile
    (-1: a spare tile of the grid's upper bound, which does nothing) and its first row; OFFS (E,)
    int32: the end row of each group."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(TILE_GROUP + tile)
    if g >= 0:
        row0 = tl.load(TILE_ROW + tile)
        end = tl.load(OFFS + g)
        rows = row0 + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        row_in = rows < end  # the tile's last rows may belong to the next group: masked, never mixed
        col_in = cols < N
        x_ptr = X + rows.to(tl.int64)[:, None] * sxm + ks[None, :] * sxk
        w_ptr = W + g.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k_in = (k0 + ks) < K
            x = tl.load(x_ptr, mask=row_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(w_ptr, mask=k_in[:, None] & col_in[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_ptr += BK * sxk
            w_ptr += BK * swk
        y_ptr = Y + rows.to(tl.int64)[:, None] * sym + cols[None, :] * syn
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _weight_mm(X, DY, DW, OFFS, N, K,
               sxm, sxk, sym, syn, swe, swk, swn,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """X (M, K), DY (M, N), DW (E, K, N); OFFS (E,) int32 end rows. Program (g, K tile, N tile) sums
    X[r, ks]^T DY[r, ns] over the rows r of group g, BM at a time."""
    g = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(OFFS + g - 1, mask=g > 0, other=0)
    end = tl.load(OFFS + g)
    ks = pid_k * BK + tl.arange(0, BK)
    cols = pid_n * BN + tl.arange(0, BN)
    rs = tl.arange(0, BM)
    k_in = ks < K
    col_in = cols < N
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + rs
        row_in = rows < end
        # X's tile read transposed, (BK, BM): the product needs X^T and the strides give it for free
        xt = tl.load(X + rows.to(tl.int64)[None, :] * sxm + ks[:, None] * sxk,
                     mask=k_in[:, None] & row_in[None, :], other=0.0)
        dy = tl.load(DY + rows.to(tl.int64)[:, None] * sym + cols[None, :] * syn,
                     mask=row_in[:, None] & col_in[None, :], other=0.0)
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
    dw_ptr = DW + g.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn
    tl.store(dw_ptr, acc.to(DW.dtype.element_ty), mask=k_in[:, None] & col_in[None, :])
