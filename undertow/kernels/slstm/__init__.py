"""sLSTM (xLSTM's scalar-memory cell) with document boundaries and carried state. See reference.py."""

from __future__ import annotations

import torch

from undertow.kernels.context import context_parallel_op
from undertow.kernels.dispatch import select_backend, triton_available
from undertow.kernels.slstm.chunked import slstm_chunked
from undertow.kernels.slstm.context import SERIAL_PASSING
from undertow.kernels.slstm.reference import slstm_reference


def _slstm_triton(*args, **kwargs):
    """The Triton form, imported on first use (whether its kernels run in the interpreter,
    TRITON_INTERPRET, is fixed when the kernel module is imported)."""
    from undertow.kernels.slstm.triton import slstm_triton

    return slstm_triton(*args, **kwargs)


IMPLEMENTATIONS = {"reference": slstm_reference, "chunked": slstm_chunked}
if triton_available():
    IMPLEMENTATIONS["triton"] = _slstm_triton


def slstm(
    gates: torch.Tensor,
    R: torch.Tensor,
    *,
    initial_state: tuple | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
):
    """gates: (B, T, 4, H, Dh) = W x_t + b for the (i, f, z, o) gates; R: (4, H, Dh, Dh), the
    block-diagonal recurrent matrix (raw_g += y_{t-1} R[g, h]); initial_state: (y, c, n, m) each
    (B, H, Dh); doc_ids: (B, T). Returns y (B, T, H, Dh) [, final_state (y, c, n, m) float32]."""
    handler = context_parallel_op("slstm", SERIAL_PASSING)
    if handler is not None:  # context parallelism: this rank's slice, the state passed rank to rank
        return handler(slstm, gates, R, initial_state=initial_state, doc_ids=doc_ids,
                       return_final_state=return_final_state, backend=backend)
    chosen = select_backend("slstm", gates, backend, tuple(IMPLEMENTATIONS))
    return IMPLEMENTATIONS[chosen](gates, R, initial_state=initial_state, doc_ids=doc_ids,
                                   return_final_state=return_final_state)
