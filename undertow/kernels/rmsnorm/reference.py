"""RMSNorm with a weight, optionally gated and grouped, the spec: plain PyTorch in float32.

    g   = x * silu(z)                          (x alone when there is no gate z)
    out = weight * g / sqrt(mean(g^2) + eps)   the mean over each group of `group_size` channels
    out is cast to `out_dtype` (x's dtype by default)

x, z: (..., dim); weight: (dim,); group_size divides dim (dim itself when None: one group).
A plain RMSNorm is the case z = None, one group; Mamba-2's gated norm uses z and dim / ngroups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_inputs(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, group_size: int | None) -> int:
    """Raise ValueError naming the argument that does not fit x: (..., dim); returns the group size."""
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"rmsnorm: weight must have shape ({dim},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"rmsnorm: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    group = dim if group_size is None else group_size
    if not isinstance(group, int) or group < 1 or dim % group != 0:
        raise ValueError(f"rmsnorm: group_size {group_size!r} must be a positive divisor of dim {dim}")
    return group


def rmsnorm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x, z: (..., dim); weight: (dim,). Returns (..., dim) in out_dtype (default x.dtype)."""
    group = check_inputs(x, weight, z, group_size)
    g = x.float()
    if z is not None:
        g = g * F.silu(z.float())
    grouped = g.unflatten(-1, (-1, group))  # (..., groups, group_size)
    normed = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    return (normed * weight.float()).to(out_dtype or x.dtype)
