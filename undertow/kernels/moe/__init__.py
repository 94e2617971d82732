"""Dropless mixture-of-experts computation (SwiGLU experts, top-k token choice). See reference.py
(the spec: a loop over experts) and grouped.py (tokens sorted by expert, grouped GEMMs).

Backends: "reference" (the loop) and "chunked" (the grouped form; its GEMM is torch._grouped_mm
where that runs on the device, else a Triton grouped GEMM on CUDA, else one matmul per expert on the
sorted rows). There is no capacity factor: every routed token is computed.
"""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import select_backend
from undertow.kernels.moe.grouped import GEMMS, choose_gemm, grouped_mm_runs, moe_grouped
from undertow.kernels.moe.reference import moe_reference

__all__ = ["moe_experts", "IMPLEMENTATIONS", "GEMMS", "grouped_mm_runs", "choose_gemm"]

IMPLEMENTATIONS = {"reference": moe_reference, "chunked": moe_grouped}


def moe_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, *, backend: str | None = None,
                gemm: str | None = None) -> torch.Tensor:
    """x (N, d) tokens; idx (N, k) int64 expert ids; weights (N, k) their mixing weights (gradients
    flow to them: the router's); w_gate, w_up (E, d, h), w_down (E, h, d) the experts' SwiGLU
    weights. Returns sum_j weights[:, j] * expert_{idx[:, j]}(x), (N, d) in x's dtype.
    `gemm` (chunked only): "grouped_mm", "split" or "triton" forces the grouped GEMM (None: by device)."""
    chosen = select_backend("moe", x, backend, tuple(IMPLEMENTATIONS))
    if chosen == "reference":
        return moe_reference(x, idx, weights, w_gate, w_up, w_down)
    return moe_grouped(x, idx, weights, w_gate, w_up, w_down, gemm=gemm)
