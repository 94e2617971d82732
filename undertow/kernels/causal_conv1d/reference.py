"""Depthwise causal conv1d, the spec: a plain loop over time in float32.

y[b, t, d] = act(bias[d] + sum_k weight[d, k] * xpad[b, t + k, d]),  k = 0..K-1,
where xpad is the row's inputs preceded by the K-1 carried-in inputs (`initial_state`),
and inputs of another document (doc_ids differ) read as zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """x: (B, T, D); weight: (D, K); bias: (D,); initial_state: (B, D, K-1), oldest first.

    Returns y (B, T, D) in x's dtype, and with return_final_state the (B, D, K-1) float32 window
    of the last K-1 inputs of the row's last segment (zeros before that segment's start).
    """
    B, T, D = x.shape
    K = weight.shape[1]
    window = (
        initial_state.float().clone() if initial_state is not None else x.new_zeros(B, D, K - 1, dtype=torch.float32)
    )
    starts = segment_starts(doc_ids, (B, T), x.device)
    w = weight.float()
    ys = []
    for t in range(T):
        reset = starts[:, t].view(B, 1, 1)
        window = torch.where(reset, torch.zeros_like(window), window)
        full = torch.cat([window, x[:, t].float().unsqueeze(-1)], dim=-1)  # (B, D, K)
        y = (full * w).sum(-1)
        if bias is not None:
            y = y + bias.float()
        ys.append(y)
        window = full[:, :, 1:]
    y = torch.stack(ys, dim=1)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"activation {activation!r} is not supported; use 'silu' or None")
    y = y.to(x.dtype)
    return (y, window) if return_final_state else y
