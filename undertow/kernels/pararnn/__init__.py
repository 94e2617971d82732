"""ParaRNN's ParaGRU / ParaLSTM recurrences with document boundaries and carried state, trained in
parallel over time by Newton's method. See reference.py (the spec) and newton.py (the solver)."""

from __future__ import annotations

import torch

from undertow.kernels.context import context_parallel_op
from undertow.kernels.dispatch import select_backend, triton_available
from undertow.kernels.pararnn.context import SPANNING_SOLVE
from undertow.kernels.pararnn.newton import NewtonNotConvergedWarning, check_solver_args, pararnn_newton
from undertow.kernels.pararnn.reference import check_inputs, pararnn_reference


def _pararnn_triton(*args, **kwargs):
    """The Newton solver with its linear recurrences in Triton (triton.py; imported on first use, so
    TRITON_INTERPRET set before then runs them in the interpreter)."""
    return pararnn_newton(*args, **kwargs, scan="triton")


IMPLEMENTATIONS = {"reference": pararnn_reference, "chunked": pararnn_newton}
if triton_available():
    IMPLEMENTATIONS["triton"] = _pararnn_triton

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
    `iterations`, `tol` and `chunk_size` steer the Newton solver ("chunked", and "triton": the same
    solver with Triton scans, chosen for CUDA tensors; float32 or lower); the reference loop is
    exact and ignores them (but refuses invalid values too). Under context parallelism (a block
    wrapped by parallel.context) the Newton solve spans the cp ranks (context.py), whatever `backend`.
    Returns h (B, T, D) in inputs' dtype [, final_state (GRU h, LSTM (c, h), float64 for float64
    inputs, else float32)] [, residual: 0-d, max |s_t - f(s_{t-1}, u_t)| at the
    returned states, zero for the reference]."""
    check_inputs(cell, inputs, a, p)
    check_solver_args(iterations, tol, chunk_size)  # refused on every backend, also where they are unused
    handler = context_parallel_op("pararnn", SPANNING_SOLVE)
    if handler is not None:  # under CP: the Newton systems span the ranks (context.py), any backend
        return handler(pararnn, cell, inputs, a, p, iterations=iterations, tol=tol, chunk_size=chunk_size,
                       initial_state=initial_state, doc_ids=doc_ids, return_final_state=return_final_state,
                       return_residual=return_residual)
    chosen = select_backend("pararnn", inputs, backend, tuple(IMPLEMENTATIONS))
    if chosen in ("chunked", "triton"):
        return IMPLEMENTATIONS[chosen](cell, inputs, a, p, iterations=iterations, tol=tol, chunk_size=chunk_size,
                              initial_state=initial_state, doc_ids=doc_ids,
                              return_final_state=return_final_state, return_residual=return_residual)
    out = pararnn_reference(cell, inputs, a, p, initial_state=initial_state, doc_ids=doc_ids,
                            return_final_state=return_final_state)
    if not return_residual:
        return out
    out = out if return_final_state else (out,)
    return (*out, inputs.new_zeros((), dtype=torch.float64 if inputs.dtype == torch.float64 else torch.float32))
