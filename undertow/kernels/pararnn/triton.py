"""The linear recurrences under ParaRNN's Newton steps in Triton: what the context-parallel form
(context.py) scans its slices with on CUDA, and the building block of the fused Newton passes of
the "triton" backend (triton_newton.py, which reuses the composition rules and tiles below).

    forward  x_t   = J_t x_{t-1} + r_t            (scan.py's linear_recurrence, eq. N1)
    reverse  lam_t = J_{t+1}^T lam_{t+1} + g_t     (reverse_linear_recurrence, eq. B1)

for J diagonal (S = 1, the GRU) or 2x2 blocks per channel (S = 2, the LSTM). One program per (row,
block of BLOCK_D channels) walks the sequence in chunks of CHUNK tokens (backwards for the
reverse): inside a chunk every token at once by `tl.associative_scan` of affine maps (M, v): x ->
M x + v, composed as (M_r M_l, M_r v_l + v_r) — the same rule both ways, since Triton's reverse scan
combines (the suffix after a token, the token); across chunks a carry, x_t = v_t + M_t carry.
Work O(T) per channel, depth O(T / CHUNK * log CHUNK); float32 in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64      # tokens a program scans at once
BLOCK_D = 16    # channels a program holds (16: B x D / 16 programs fill a GPU at B = 4, D = 1024; untuned)


@triton.jit
def _compose1(a_l, v_l, a_r, v_r):
    return a_r * a_l, a_r * v_l + v_r


@triton.jit
def _compose2(m00_l, m01_l, m10_l, m11_l, v0_l, v1_l, m00_r, m01_r, m10_r, m11_r, v0_r, v1_r):
    return (m00_r * m00_l + m01_r * m10_l, m00_r * m01_l + m01_r * m11_l,
            m10_r * m00_l + m11_r * m10_l, m10_r * m01_l + m11_r * m11_l,
            m00_r * v0_l + m01_r * v1_l + v0_r, m10_r * v0_l + m11_r * v1_l + v1_r)


@triton.jit
def _row(x, rows, which: tl.constexpr):
    """Row `which` of a (CHUNK, BLOCK_D) tile as (BLOCK_D,)."""
    return tl.sum(tl.where(rows[:, None] == which, x, 0.0), axis=0)


@triton.jit
def _linear_recurrence(J, R, X, T, D, S: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """J (B, T, S, S, D), R and X (B, T, S, D), contiguous float32; grid (B, cdiv(D, BLOCK_D))."""
    b = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    rows = tl.arange(0, CHUNK)
    c0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    c1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    chunks = tl.cdiv(T, CHUNK)
    for step in range(0, chunks):
        chunk = chunks - 1 - step if REVERSE else step
        t = chunk * CHUNK + rows
        mask = (t < T)[:, None] & dmask[None, :]
        # the transition of token t: J_t forward; J_{t+1}^T in reverse (zero after the last token)
        src = t + 1 if REVERSE else t
        jmask = (src < T)[:, None] & dmask[None, :]
        jbase = ((b * T + src.to(tl.int64)) * S * S)[:, None] * D + dd[None, :]
        rbase = ((b * T + t.to(tl.int64)) * S)[:, None] * D + dd[None, :]
        if S == 1:
            a = tl.load(J + jbase, mask=jmask, other=0.0).to(tl.float32)
            v = tl.load(R + rbase, mask=mask, other=0.0).to(tl.float32)
            m, v = tl.associative_scan((a, v), 0, _compose1, reverse=REVERSE)
            x = v + m * c0[None, :]
            tl.store(X + rbase, x, mask=mask)
            c0 = _row(x, rows, 0) if REVERSE else _row(x, rows, CHUNK - 1)
        else:
            m00 = tl.load(J + jbase, mask=jmask, other=0.0).to(tl.float32)
            m01 = tl.load(J + jbase + D, mask=jmask, other=0.0).to(tl.float32)
            m10 = tl.load(J + jbase + 2 * D, mask=jmask, other=0.0).to(tl.float32)
            m11 = tl.load(J + jbase + 3 * D, mask=jmask, other=0.0).to(tl.float32)
            if REVERSE:  # the transposed block
                m01, m10 = m10, m01
            v0 = tl.load(R + rbase, mask=mask, other=0.0).to(tl.float32)
            v1 = tl.load(R + rbase + D, mask=mask, other=0.0).to(tl.float32)
            m00, m01, m10, m11, v0, v1 = tl.associative_scan((m00, m01, m10, m11, v0, v1), 0, _compose2,
                                                             reverse=REVERSE)
            x0 = v0 + m00 * c0[None, :] + m01 * c1[None, :]
            x1 = v1 + m10 * c0[None, :] + m11 * c1[None, :]
            tl.store(X + rbase, x0, mask=mask)
            tl.store(X + rbase + D, x1, mask=mask)
            if REVERSE:
                c0, c1 = _row(x0, rows, 0), _row(x1, rows, 0)
            else:
                c0, c1 = _row(x0, rows, CHUNK - 1), _row(x1, rows, CHUNK - 1)


def linear_recurrence_triton(J: torch.Tensor, r: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """J (B, T, S, S, D), r (B, T, S, D), float32 -> x (B, T, S, D): scan.py's `linear_recurrence`
    (reverse=False) or `reverse_linear_recurrence` (reverse=True) for the same arguments."""
    B, T, S, _, D = J.shape
    if S not in (1, 2):
        raise ValueError(f"pararnn triton scan: blocks of size 1 or 2, got {S}")
    J, r = J.float().contiguous(), r.float().contiguous()
    x = torch.empty_like(r)
    if x.numel():
        _linear_recurrence[(B, triton.cdiv(D, BLOCK_D))](J, r, x, T, D, S=S, REVERSE=reverse, CHUNK=CHUNK,
                                                          BLOCK_D=BLOCK_D)  # module globals: tests shrink them
    return x
