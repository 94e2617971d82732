"""Depthwise causal conv1d as K shifted products: vectorized PyTorch with autograd.

The row is left-padded with the carried-in window (`initial_state`), so tap k of output t reads
xpad[t + k]. A tap is kept only when it lies in t's document: every position gets a segment index
(the count of document starts up to it; the carried-in window belongs to segment 0), and tap and
output must share it. Only the first K-1 outputs of a document can read across its start, so the
K products run unmasked over the whole row and those few outputs get their crossing taps taken
back out (gathered, then added with index_put): masking every tap of every position cost more than
the convolution itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts


def padded_inputs(x: torch.Tensor, initial_state: torch.Tensor | None, K: int) -> torch.Tensor:
    """(B, T+K-1, D) float32: the carried-in window (zeros without `initial_state`) then x."""
    B, D = x.shape[0], x.shape[2]
    if initial_state is None:
        return F.pad(x.float(), (0, 0, K - 1, 0))
    if initial_state.shape != (B, D, K - 1):
        raise ValueError(f"causal_conv1d: initial_state has shape {tuple(initial_state.shape)}; expected {(B, D, K - 1)}")
    return torch.cat([initial_state.float().transpose(1, 2), x.float()], dim=1)


def segment_index(doc_ids: torch.Tensor | None, B: int, T: int, K: int, device) -> torch.Tensor:
    """(B, T+K-1) int32 segment of every padded position; the K-1 carried-in slots are segment 0."""
    seg = segment_starts(doc_ids, (B, T), device).cumsum(1, dtype=torch.int32)
    return F.pad(seg, (K - 1, 0))


def final_window(xpad: torch.Tensor, segpad: torch.Tensor, K: int) -> torch.Tensor:
    """(B, D, K-1) float32: the last K-1 inputs, zeroed where they precede the last segment."""
    keep = segpad[:, -(K - 1):] == segpad[:, -1:]
    return (xpad[:, -(K - 1):] * keep.unsqueeze(-1)).transpose(1, 2)


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "silu":
        return F.silu(y)
    if activation is not None:
        raise ValueError(f"activation {activation!r} is not supported; use 'silu' or None")
    return y


def _remove_crossing_taps(y, xpad, w, segpad, seg, K):
    """y minus, at each output t, the taps k whose input lies before t's document (B, T, D)."""
    if y.device.type == "meta":  # the planner's memory profile: values unknown, nothing to gather
        return y
    # (B, T, K) whether tap k of output t crosses into an earlier document; small (no D)
    crossing = segpad.unfold(1, K, 1) != seg.unsqueeze(-1)
    rows, cols = crossing.any(-1).nonzero(as_tuple=True)  # ~(K-1) outputs per document start
    if rows.numel() == 0:
        return y
    taps = xpad[rows[:, None], cols[:, None] + torch.arange(K, device=y.device)]  # (n, K, D)
    removed = (taps * w * crossing[rows, cols].unsqueeze(-1)).sum(1)  # (n, D)
    return y.index_put_((rows, cols), -removed, accumulate=True)


def causal_conv1d_chunked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """x: (B, T, D); weight: (D, K); bias: (D,); initial_state: (B, D, K-1), oldest first;
    doc_ids: (B, T). Returns y (B, T, D) in x's dtype [, final_state (B, D, K-1) float32]."""
    B, T, D = x.shape
    K = weight.shape[1]
    xpad = padded_inputs(x, initial_state, K)
    segpad = segment_index(doc_ids, B, T, K, x.device)
    seg = segpad[:, K - 1:]
    w = weight.float().t().contiguous()  # (K, D): each tap's weights contiguous, for the fast broadcast
    # one output buffer, the taps added in place (a fresh 4 MB tensor per tap costs page faults)
    y = xpad[:, :T] * w[0]
    if bias is not None:
        y += bias.float()
    for k in range(1, K):
        y.addcmul_(xpad[:, k:k + T], w[k])
    if doc_ids is not None and K > 1:
        y = _remove_crossing_taps(y, xpad, w, segpad, seg, K)
    y = apply_activation(y, activation).to(x.dtype)
    return (y, final_window(xpad, segpad, K)) if return_final_state else y
