"""RMSNorm with a weight, optionally gated by silu(z) and normalized per group. See reference.py (the spec)."""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import select_backend, triton_available
from undertow.kernels.rmsnorm.chunked import rmsnorm_chunked
from undertow.kernels.rmsnorm.reference import rmsnorm_reference


def _rmsnorm_triton(*args, **kwargs):
    """The Triton form, imported on first use: triton is slow to import, and whether its kernels run
    in the interpreter (TRITON_INTERPRET) is fixed when the kernel module is imported."""
    from undertow.kernels.rmsnorm.triton import rmsnorm_triton

    return rmsnorm_triton(*args, **kwargs)


IMPLEMENTATIONS = {"reference": rmsnorm_reference, "chunked": rmsnorm_chunked}
if triton_available():
    IMPLEMENTATIONS["triton"] = _rmsnorm_triton


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """weight * rmsnorm(x * silu(z)) over each group of `group_size` channels (all of dim when None;
    no gate when z is None), computed in float32. x, z: (..., dim) in float32/float16/bfloat16;
    weight: (dim,). Returns (..., dim) in out_dtype (default x.dtype). Backward saves only the inputs
    and the float32 1/rms per group (chunked and Triton forms)."""
    chosen = select_backend("rmsnorm", x, backend, tuple(IMPLEMENTATIONS))
    return IMPLEMENTATIONS[chosen](x, weight, z=z, group_size=group_size, eps=eps, out_dtype=out_dtype)
