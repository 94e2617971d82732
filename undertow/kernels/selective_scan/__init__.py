"""Mamba-1 selective scan with document boundaries and carried state. See reference.py (the spec)."""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import select_backend, triton_available
from undertow.kernels.selective_scan.chunked import selective_scan_chunked
from undertow.kernels.selective_scan.reference import selective_scan_reference
from undertow.kernels.context import context_parallel_op
from undertow.kernels.selective_scan.context import STATE_PASSING

IMPLEMENTATIONS = {"reference": selective_scan_reference, "chunked": selective_scan_chunked}
if triton_available():
    from undertow.kernels.selective_scan.triton import selective_scan_triton

    IMPLEMENTATIONS["triton"] = selective_scan_triton


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    *,
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
):
    """u, delta, z: (Bt, T, Dc); A: (Dc, N); B, C: (Bt, T, N); D, delta_bias: (Dc,);
    initial_state: (Bt, Dc, N); doc_ids: (Bt, T). Returns y (Bt, T, Dc) [, final_state (Bt, Dc, N) fp32]."""
    handler = context_parallel_op("selective_scan", STATE_PASSING)
    if handler is not None:  # context parallelism: this rank's slice, states passed between ranks
        return handler(selective_scan, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                       delta_softplus=delta_softplus, initial_state=initial_state, doc_ids=doc_ids,
                       return_final_state=return_final_state, backend=backend)
    chosen = select_backend("selective_scan", u, backend, tuple(IMPLEMENTATIONS))
    return IMPLEMENTATIONS[chosen](
        u, delta, A, B, C, D, z, delta_bias, delta_softplus,
        initial_state=initial_state, doc_ids=doc_ids, return_final_state=return_final_state,
    )
