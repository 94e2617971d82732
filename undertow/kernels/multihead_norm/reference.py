"""xLSTM's per-head norm with its output gate, the spec:

    y = sigmoid(o) * (LayerNorm over each head's Dv channels of h, no bias) * weight

h (..., H, Dv), o (..., H * Dv) or None (no gate), weight (H * Dv,) -> (..., H * Dv); the norm in
float32, cast to h's dtype, then gated in o's dtype (xLSTM-7B's MultiHeadLayerNorm, then its
sigmoid output gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_norm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float, o: torch.Tensor | None = None):
    normed = (F.layer_norm(h.float(), h.shape[-1:], eps=eps).flatten(-2) * weight.float()).to(h.dtype)
    return normed if o is None else torch.sigmoid(o) * normed.to(o.dtype)
