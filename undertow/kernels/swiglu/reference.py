"""SwiGLU's activation, the spec: silu(g) * u (Shazeer, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u = g sigmoid(g) u, elementwise; g, u of one shape; autograd does the backward."""
    if g.shape != u.shape:
        raise ValueError(f"swiglu: g {tuple(g.shape)} and u {tuple(u.shape)} must have one shape")
    return F.silu(g) * u
