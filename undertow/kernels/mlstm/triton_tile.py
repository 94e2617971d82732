"""The state tile an mLSTM Triton program owns, as the step kernels (triton.py) and the chunkwise
kernels (triton_chunk.py) lay it out: all of Dqk (one BK tile) by one BV-wide tile of Dv, per
(batch, head). One place for the indices, masks and the carried-in state load, so the kernels agree."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _state_tile(pid_v, Dqk, Dv, BK: tl.constexpr, BV: tl.constexpr):
    """v tile pid_v's view of a (Dqk, Dv) state -> kk (BK,), vv (BV,), kmask, vmask, the tile's (BK, BV)
    mask and row-major offsets, and n_mask: n (Dqk,) and m do not depend on v, so only the first v
    tile writes them (n_mask is all-false on the others)."""
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    kmask, vmask = kk < Dqk, vv < Dv
    cmask = kmask[:, None] & vmask[None, :]
    c_off = kk[:, None] * Dv + vv[None, :]
    n_mask = kk < tl.where(pid_v == 0, Dqk, 0)
    return kk, vv, kmask, vmask, cmask, c_off, n_mask


@triton.jit
def _initial_state(C0, N0, M0, bh, kk, kmask, c_off, cmask, Dqk, Dv,
                   HAS_INIT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Row bh's carried-in state on this tile, float32: C (BK, BV), n (BK,), m (); zeros without HAS_INIT.
    C0 (B*H, Dqk, Dv), N0 (B*H, Dqk), M0 (B*H,)."""
    if HAS_INIT:
        C = tl.load(C0 + bh * Dqk * Dv + c_off, mask=cmask, other=0.0)
        n = tl.load(N0 + bh * Dqk + kk, mask=kmask, other=0.0)
        m = tl.load(M0 + bh)
    else:
        C = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
        m = tl.full([], 0.0, tl.float32)
    return C, n, m
