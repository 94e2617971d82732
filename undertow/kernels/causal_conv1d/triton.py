"""Depthwise causal conv1d in Triton: fused SiLU, document boundaries, carried window, and a
Triton backward for x, weight, bias and initial_state. Channels-last (B, T, D), K in 2..4.

Forward: one program per (row, block of T, block of D) sums the K taps in float32. Backward:
the same kernel recomputes the pre-activation and turns dy into g = dy * silu'(pre); a second
kernel walks the padded positions p (the K-1 carried-in slots, then x) and gathers
dxpad[p] = sum_k w[k] g[p - k] over the outputs in p's document, and reduces the weight and bias
gradients of its block of outputs into per-block partial sums. The final window comes from
chunked.py's PyTorch code on the last K-1 inputs, so its gradient needs no kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from undertow.kernels.causal_conv1d.chunked import (
    final_window,
    padded_inputs,
    segment_index,
)

BLOCK_T = 64


@triton.jit
def _tap(x_ptr, init_ptr, seg_ptr, b, s, d, seg_out, live, dmask, T, D,
         K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOCS: tl.constexpr):
    """(BT, BD) float32 inputs at positions s (negative: the carried-in window) for outputs whose
    segment is seg_out; zero where the input lies in another document or `live` is False."""
    in_x = live & (s >= 0) & (s < T)
    val = tl.load(x_ptr + (b * T + s)[:, None] * D + d[None, :], mask=in_x[:, None] & dmask[None, :], other=0.0)
    val = val.to(tl.float32)
    if HAS_INIT:
        in_init = live & (s < 0)
        w_idx = (s + K - 1)[:, None]
        prev = tl.load(init_ptr + b * D * (K - 1) + d[None, :] * (K - 1) + w_idx,
                       mask=in_init[:, None] & dmask[None, :], other=0.0)
        val += prev.to(tl.float32)
    if HAS_DOCS:
        seg_in = tl.load(seg_ptr + b * T + s, mask=in_x, other=0)  # the carried-in window is segment 0
        val = tl.where((seg_in == seg_out)[:, None], val, 0.0)
    return val


@triton.jit
def _conv_fwd(x_ptr, w_ptr, bias_ptr, init_ptr, seg_ptr, dy_ptr, out_ptr, T, D,
              K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOCS: tl.constexpr,
              SILU: tl.constexpr, GRAD: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """out = act(conv(x)) (B, T, D); with GRAD, out = dy * act'(conv(x)) in float32."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    live, dmask = t < T, d < D
    seg_out = tl.load(seg_ptr + b * T + t, mask=live, other=0) if HAS_DOCS else 0
    pre = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + d * K + k, mask=dmask, other=0.0).to(tl.float32)
        pre += w[None, :] * _tap(x_ptr, init_ptr, seg_ptr, b, t - (K - 1 - k), d, seg_out, live, dmask, T, D,
                                 K, HAS_INIT, HAS_DOCS and k < K - 1)
    offs = (b * T + t)[:, None] * D + d[None, :]
    mask = live[:, None] & dmask[None, :]
    if GRAD:
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        tl.store(out_ptr + offs, g, mask=mask)
    else:
        if SILU:
            pre = pre * tl.sigmoid(pre)
        tl.store(out_ptr + offs, pre.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd(g_ptr, x_ptr, w_ptr, init_ptr, seg_ptr, dx_ptr, dinit_ptr, dw_part_ptr, db_part_ptr, T, D,
              K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOCS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Program (b, j, .) covers padded positions p = j*BT + [0, BT), i.e. x positions s = p - (K-1),
    and outputs t = j*BT + [0, BT). Writes dx, dinit, and (K, BD) / (BD,) partial dw / db."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    dmask = d < D
    s = j * BT + tl.arange(0, BT) - (K - 1)
    in_x = (s >= 0) & (s < T)
    seg_in = tl.load(seg_ptr + b * T + s, mask=in_x, other=0) if HAS_DOCS else 0
    dxp = tl.zeros((BT, BD), dtype=tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + d * K + k, mask=dmask, other=0.0).to(tl.float32)
        t = s + (K - 1 - k)  # the output that reads position s through tap k
        reads = (t >= 0) & (t < T)
        g = tl.load(g_ptr + (b * T + t)[:, None] * D + d[None, :], mask=reads[:, None] & dmask[None, :], other=0.0)
        if HAS_DOCS and k < K - 1:
            seg_out = tl.load(seg_ptr + b * T + t, mask=reads, other=0)
            g = tl.where((seg_in == seg_out)[:, None], g, 0.0)
        dxp += w[None, :] * g
    tl.store(dx_ptr + (b * T + s)[:, None] * D + d[None, :], dxp.to(dx_ptr.dtype.element_ty),
             mask=in_x[:, None] & dmask[None, :])
    if HAS_INIT:
        in_init = (s < 0) & (s >= -(K - 1))
        tl.store(dinit_ptr + b * D * (K - 1) + d[None, :] * (K - 1) + (s + K - 1)[:, None],
                 dxp.to(dinit_ptr.dtype.element_ty), mask=in_init[:, None] & dmask[None, :])
    t = j * BT + tl.arange(0, BT)
    live = t < T
    g = tl.load(g_ptr + (b * T + t)[:, None] * D + d[None, :], mask=live[:, None] & dmask[None, :], other=0.0)
    seg_out = tl.load(seg_ptr + b * T + t, mask=live, other=0) if HAS_DOCS else 0
    part = (b * tl.num_programs(1) + j) * (K + 1) * D
    for k in tl.static_range(K):
        tap = _tap(x_ptr, init_ptr, seg_ptr, b, t - (K - 1 - k), d, seg_out, live, dmask, T, D,
                   K, HAS_INIT, HAS_DOCS and k < K - 1)
        tl.store(dw_part_ptr + part + k * D + d, tl.sum(g * tap, axis=0), mask=dmask)
    tl.store(db_part_ptr + part + K * D + d, tl.sum(g, axis=0), mask=dmask)


def _grid(B: int, positions: int, D: int, block_d: int):
    return (B, triton.cdiv(positions, BLOCK_T), triton.cdiv(D, block_d))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seg, silu):
        B, T, D = x.shape
        K = weight.shape[1]
        block_d = min(64, triton.next_power_of_2(D))
        y = torch.empty_like(x)
        flags = {"K": K, "HAS_INIT": initial_state is not None, "HAS_DOCS": seg is not None, "BT": BLOCK_T, "BD": block_d}
        _conv_fwd[_grid(B, T, D, block_d)](
            x, weight, bias if bias is not None else x, initial_state if initial_state is not None else x,
            seg if seg is not None else x, x, y, T, D, HAS_BIAS=bias is not None, SILU=silu, GRAD=False, **flags,
        )
        ctx.save_for_backward(x, weight, bias, initial_state, seg)
        ctx.silu, ctx.flags, ctx.block_d = silu, flags, block_d
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, initial_state, seg = ctx.saved_tensors
        B, T, D = x.shape
        K, block_d, flags = weight.shape[1], ctx.block_d, ctx.flags
        init_arg = initial_state if initial_state is not None else x
        seg_arg = seg if seg is not None else x
        g = torch.empty(B, T, D, device=x.device, dtype=torch.float32)
        _conv_fwd[_grid(B, T, D, block_d)](
            x, weight, bias if bias is not None else x, init_arg, seg_arg, dy.contiguous(), g, T, D,
            HAS_BIAS=bias is not None, SILU=ctx.silu, GRAD=True, **flags,
        )
        grid = _grid(B, T + K - 1, D, block_d)
        dx = torch.empty_like(x)
        dinit = torch.empty_like(initial_state) if initial_state is not None else None
        parts = torch.empty(B, grid[1], K + 1, D, device=x.device, dtype=torch.float32)
        _conv_bwd[grid](g, x, weight, init_arg, seg_arg, dx, dinit if dinit is not None else x, parts, parts, T, D, **flags)
        sums = parts.sum((0, 1))
        dw = sums[:K].t().to(weight.dtype)
        db = sums[K].to(bias.dtype) if bias is not None else None
        return dx, dw, db, dinit, None, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """x: (B, T, D); weight: (D, K), 2 <= K <= 4; bias: (D,); initial_state: (B, D, K-1), oldest
    first; doc_ids: (B, T). Returns y (B, T, D) in x's dtype [, final_state (B, D, K-1) float32]."""
    B, T, D = x.shape
    K = weight.shape[1]
    if not 2 <= K <= 4 or weight.shape[0] != D:
        raise ValueError(f"causal_conv1d (triton): weight has shape {tuple(weight.shape)}; expected ({D}, K), 2 <= K <= 4")
    if activation not in ("silu", None):
        raise ValueError(f"activation {activation!r} is not supported; use 'silu' or None")
    tail = padded_inputs(x[:, -(K - 1):], initial_state, K)[:, -(K - 1):]  # also checks initial_state's shape
    segpad = segment_index(doc_ids, B, T, K, x.device)
    seg = segpad[:, K - 1:].contiguous() if doc_ids is not None else None
    y = _CausalConv1d.apply(
        x.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
        initial_state.contiguous() if initial_state is not None else None, seg, activation == "silu",
    )
    return (y, final_window(tail, segpad, K)) if return_final_state else y
