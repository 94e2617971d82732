"""ParaRNN's ParaGRU / ParaLSTM recurrences with document boundaries and carried state, trained in
parallel over time by Newton's method. See reference.py (the spec) and newton.py (the solver)."""

from __future__ import annotations

import torch

from undertow.kernels.context import context_parallel_op
from undertow.kernels.dispatch import select_backend
from undertow.kernels.pararnn.newton import NewtonNotConvergedWarning, pararnn_newton
from undertow.kernels.pararnn.reference import pararnn_reference

IMPLEMENTATIONS = {"reference": pararnn_reference, "chunked": pararnn_newton}

__all__ = ["pararnn", "NewtonNotConvergedWarning", "IMPLEMENTATIONS"]


def pararnn(
    cell: str,
    inputs: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor | None = None,
    *,
    iterations: int = 3,
    tol: float | None = None,
    chunk_size: int = 64,
    initial_state=None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
    return_residual: bool = False,
    backend: str | None = None,
):
    """cell: "gru" or "lstm"; inputs: (B, T, 3, D) = B x + b per gate (GRU: z, r, h; LSTM: f, c, o);
    a: (3, D) the diagonal recurrent weights in the same gate order; p: (2, D) the LSTM's peepholes
    (p_f, p_o), None for the GRU; initial_state: GRU h (B, D), LSTM (c, h) each (B, D); doc_ids: (B, T).
    `iterations`, `tol` and `chunk_size` steer the Newton solver ("chunked"); the reference loop is
    exact and ignores them. Returns h (B, T, D) in inputs' dtype [, final_state (GRU h, LSTM (c, h),
    float64 for float64 inputs, else float32)] [, residual: 0-d, max |s_t - f(s_{t-1}, u_t)| at the
    returned states, zero for the reference]."""
    # No CP form yet (issue 16: Newton systems spanning the ranks): under CP no "pararnn" handler is
    # installed, so this raises rather than solving each rank's slice from the wrong initial state.
    context_parallel_op("pararnn")
    chosen = select_backend("pararnn", inputs, backend, tuple(IMPLEMENTATIONS))
    if chosen == "chunked":
        return pararnn_newton(cell, inputs, a, p, iterations=iterations, tol=tol, chunk_size=chunk_size,
                              initial_state=initial_state, doc_ids=doc_ids,
                              return_final_state=return_final_state, return_residual=return_residual)
    out = pararnn_reference(cell, inputs, a, p, initial_state=initial_state, doc_ids=doc_ids,
                            return_final_state=return_final_state)
    if not return_residual:
        return out
    out = out if return_final_state else (out,)
    return (*out, inputs.new_zeros((), dtype=torch.float64 if inputs.dtype == torch.float64 else torch.float32))
