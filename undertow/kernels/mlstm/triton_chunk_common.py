"""What the chunkwise mLSTM's forward (triton_chunk.py) and backward (triton_chunk_bwd.py) kernels share:
tile sizes and the in-kernel helpers that rebuild a chunk's gate terms, so both take the same numbers."""

from __future__ import annotations

import triton
import triton.language as tl

from undertow.kernels.mlstm.limits import MAX_DQK  # noqa: F401  (re-exported for the kernels)

BLOCK_V = 64  # widest v tile (the grid's second level); a test lowers it so tiny Dv still splits
# 8 warps: compiled for sm_90 (bf16, Dqk = 128, BV = 64, chunk 64) the kernels spill 2-10x less than at 4
# (scripts/mlstm_sm90_compile.py; docs/mlstm_kernel_notes.md); untuned on a GPU
NUM_WARPS = 8


@triton.jit
def _dot(a, b, IS_F32: tl.constexpr):
    """a @ b with float32 accumulation: exact float32 (no tf32) for float32 inputs, else the operands in
    the inputs' half type (b's type), as TFLA does."""
    if IS_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _chunk_gates(I, F, SEG, b, h, c, T, H, L, BL: tl.constexpr):
    """The chunk's gate terms, (BL,) each, and the (BL, BL) document-causal mask: same[t, s] (s <= t,
    one document, both real tokens), base_t, D's row offsets i~_s - base_s, carried_t (t's document is
    the one carried into the chunk) and the in-chunk index tt."""
    tt = tl.arange(0, BL)
    pos = c * L + tt
    real = (tt < L) & (pos < T)
    row = (b * T + pos) * H + h
    i_raw = tl.load(I + row, mask=real, other=0.0).to(tl.float32)
    f_raw = tl.load(F + row, mask=real, other=0.0).to(tl.float32)
    lf = tl.minimum(f_raw, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f_raw)))  # logsigmoid(f~), no overflow
    seg = tl.load(SEG + b * T + pos, mask=real, other=-1)
    seg_ref = tl.load(SEG + b * T + tl.maximum(c * L - 1, 0))  # the token before the chunk (token 0 in chunk 0)
    same = (seg[:, None] == seg[None, :]) & (tt[None, :] <= tt[:, None]) & real[:, None] & real[None, :]
    base = tl.sum(tl.where(same, lf[None, :], 0.0), axis=1)  # sum of lf over [start_t, t]
    return same, base, i_raw - base, real & (seg == seg_ref), tt


def _blocks(L: int, Dqk: int, Dv: int) -> tuple[int, int, int, int]:
    """(BL, BK, BV, number of v tiles): tl.dot needs every side >= 16; all of Dqk in one tile."""
    BV = max(16, min(triton.next_power_of_2(Dv), BLOCK_V))
    return max(16, triton.next_power_of_2(L)), max(16, triton.next_power_of_2(Dqk)), BV, triton.cdiv(Dv, BV)
