"""Depthwise causal conv1d with SiLU, document boundaries and carried conv state. See reference.py (the spec)."""

from __future__ import annotations

import torch

from undertow.kernels.causal_conv1d.chunked import causal_conv1d_chunked
from undertow.kernels.causal_conv1d.reference import causal_conv1d_reference
from undertow.kernels.dispatch import select_backend, triton_available
from undertow.kernels.context import context_parallel_op
from undertow.kernels.causal_conv1d.context import STATE_PASSING

IMPLEMENTATIONS = {"reference": causal_conv1d_reference, "chunked": causal_conv1d_chunked}
if triton_available():
    from undertow.kernels.causal_conv1d.triton import causal_conv1d_triton

    IMPLEMENTATIONS["triton"] = causal_conv1d_triton


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
):
    """x: (B, T, D); weight: (D, K), 2 <= K <= 4; bias: (D,); initial_state: (B, D, K-1);
    doc_ids: (B, T). Returns y (B, T, D) [, final_state (B, D, K-1) float32]."""
    handler = context_parallel_op("causal_conv1d", STATE_PASSING)
    if handler is not None:  # context parallelism: the previous rank's last K-1 inputs are the halo
        return handler(causal_conv1d, x, weight, bias, activation=activation, initial_state=initial_state,
                       doc_ids=doc_ids, return_final_state=return_final_state, backend=backend)
    chosen = select_backend("causal_conv1d", x, backend, tuple(IMPLEMENTATIONS))
    return IMPLEMENTATIONS[chosen](
        x, weight, bias, activation=activation, initial_state=initial_state, doc_ids=doc_ids,
        return_final_state=return_final_state,
    )
