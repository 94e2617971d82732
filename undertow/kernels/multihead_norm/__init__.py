"""xLSTM's per-head LayerNorm with its sigmoid output gate. See reference.py (the spec); chunked.py
is the CPU form (one native pass each way)."""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import select_backend
from undertow.kernels.multihead_norm.chunked import multihead_norm_chunked
from undertow.kernels.multihead_norm.reference import multihead_norm_reference

IMPLEMENTATIONS = {"reference": multihead_norm_reference, "chunked": multihead_norm_chunked}


def multihead_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, o: torch.Tensor | None = None, *,
                   backend: str | None = None) -> torch.Tensor:
    """sigmoid(o) * per-head LayerNorm(h) * weight (no gate when o is None). h (..., H, Dv), o
    (..., H * Dv), weight (H * Dv,) -> (..., H * Dv)."""
    chosen = select_backend("multihead_norm", h, backend, tuple(IMPLEMENTATIONS))
    return IMPLEMENTATIONS[chosen](h, weight, eps, o)
