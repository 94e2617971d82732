"""Weightless RMS normalization and the grouped, gated RMSNorm of Mamba-2."""

import torch
from torch import nn

from undertow.kernels.rmsnorm import rmsnorm
from undertow.models.common.shards import local_shard


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, computed in float32, no weight. x: (..., dim) -> (..., dim) in x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """weight * rmsnorm(y * silu(z)), normalized separately over each group of `group_size` channels.

    y, z: (..., dim) -> (..., dim). One group (group_size == dim) is a plain gated RMSNorm; Mamba-2
    uses dim / ngroups so each tensor-parallel shard of whole groups normalizes locally (y, z and
    the weight are then this rank's channels). Computed in float32 by the fused kernel
    (undertow.kernels.rmsnorm), which saves only y, z and 1/rms per group for backward.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if group_size < 1 or dim % group_size != 0:
            raise ValueError(f"GatedRMSNorm: group_size {group_size} must divide dim {dim}")
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return rmsnorm(y, local_shard(self.weight), z=z, group_size=self.group_size, eps=self.eps)
