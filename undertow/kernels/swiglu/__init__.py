"""SwiGLU's activation silu(g) * u. See reference.py (the spec); chunked.py is the CPU form (one
native pass each way)."""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import select_backend
from undertow.kernels.swiglu.chunked import swiglu_chunked
from undertow.kernels.swiglu.reference import swiglu_reference

IMPLEMENTATIONS = {"reference": swiglu_reference, "chunked": swiglu_chunked}


def swiglu(g: torch.Tensor, u: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(g) * u; g, u (...) of one shape and dtype -> (...). On CPU float32 one native pass forward
    and one backward, saving only g and u; elsewhere PyTorch's ops (which torch.compile and CUDA fuse)."""
    chosen = select_backend("swiglu", g, backend, tuple(IMPLEMENTATIONS))
    return IMPLEMENTATIONS[chosen](g, u)
