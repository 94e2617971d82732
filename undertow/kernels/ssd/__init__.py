"""Mamba-2 SSD with document boundaries and carried state. See reference.py (the spec)."""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import select_backend, triton_available
from undertow.kernels.ssd.chunked import ssd_chunked
from undertow.kernels.ssd.reference import ssd_reference
from undertow.kernels.context import context_parallel_op
from undertow.kernels.ssd.context import STATE_PASSING


def _ssd_triton(*args, **kwargs):
    """The Triton form, imported on first use: triton is slow to import, and whether its kernels run
    in the interpreter (TRITON_INTERPRET) is fixed when the kernel module is imported."""
    from undertow.kernels.ssd.triton import ssd_triton

    return ssd_triton(*args, **kwargs)


IMPLEMENTATIONS = {"reference": ssd_reference, "chunked": ssd_chunked}
if triton_available():  # without triton the package still imports, with reference and chunked
    IMPLEMENTATIONS["triton"] = _ssd_triton


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
):
    """x, z: (Bt, T, H, P); dt: (Bt, T, H); A, dt_bias: (H,); B, C: (Bt, T, G, N); D: (H,) or (H, P);
    initial_state: (Bt, H, P, N); doc_ids: (Bt, T). `chunk_size` is used by the chunked and Triton forms.
    Returns y (Bt, T, H, P) [, final_state (Bt, H, P, N) float32]."""
    handler = context_parallel_op("ssd", STATE_PASSING)
    if handler is not None:  # context parallelism: this rank's slice, states passed between ranks
        return handler(ssd, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                       chunk_size=chunk_size, initial_state=initial_state, doc_ids=doc_ids,
                       return_final_state=return_final_state, backend=backend)
    chosen = select_backend("ssd", x, backend, tuple(IMPLEMENTATIONS))
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                  initial_state=initial_state, doc_ids=doc_ids, return_final_state=return_final_state)
    if chosen != "reference":
        kwargs["chunk_size"] = chunk_size
    return IMPLEMENTATIONS[chosen](x, dt, A, B, C, **kwargs)
