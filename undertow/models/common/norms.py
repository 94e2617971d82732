"""Normalization layers."""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard

from undertow.kernels.rmsnorm import rmsnorm
from undertow.kernels.rmsnorm.reference import rmsnorm_reference


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32. x: (..., dim) -> (..., dim) in
    out_dtype (x's dtype by default). The fused kernel (undertow.kernels.rmsnorm) saves only x and
    the float32 1/rms for backward."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if not isinstance(x, DTensor):
            return rmsnorm(x, self.weight, eps=self.eps, out_dtype=out_dtype)
        w = self.weight
        if isinstance(w, DTensor) and all(p.is_replicate() for p in w.placements) and all(
                isinstance(p, Shard) and p.dim % x.ndim != x.ndim - 1 for p in x.placements):
            # sequence parallelism: per-token math on this rank's tokens (the fused kernel); the
            # replicated weight's gradient from here is this rank's part of a sum (Partial)
            w = w.to_local(grad_placements=[Partial()] * len(w.placements))
            out = rmsnorm(x.to_local(), w, eps=self.eps, out_dtype=out_dtype)
            return DTensor.from_local(out, x.device_mesh, x.placements, run_check=False)
        return rmsnorm_reference(x, self.weight, eps=self.eps, out_dtype=out_dtype)  # DTensor ops
