"""The mLSTM of xLSTM-7B with document boundaries and carried state. See reference.py (the spec)."""

from __future__ import annotations

import os

import torch

from undertow.kernels.context import context_parallel_op
from undertow.kernels.dispatch import select_backend, triton_available
from undertow.kernels.mlstm.chunked import mlstm_chunked
from undertow.kernels.mlstm.context import STATE_PASSING
from undertow.kernels.mlstm.reference import State, mlstm_reference, mlstm_step

__all__ = ["mlstm", "mlstm_step", "IMPLEMENTATIONS"]


TRITON_FORM_ENV = "UNDERTOW_MLSTM_TRITON"  # "chunk" (default) or "recurrent": which Triton form is "triton"
TRITON_FORMS = ("chunk", "recurrent")


def _mlstm_triton(*args, **kwargs):
    """The "triton" backend: the chunkwise form (triton_chunk.py: forward kernels parallel over chunks,
    exact backward) by default for every length; UNDERTOW_MLSTM_TRITON=recurrent picks the fused
    recurrent form (triton.py: one token at a time, forward and backward in Triton) for A/B timing on a
    GPU. Imported on first use (whether the kernels run in the interpreter, TRITON_INTERPRET, is fixed
    when the kernel module is imported). Decoding does not come here: it steps with `mlstm_step`."""
    form = os.environ.get(TRITON_FORM_ENV, "chunk")
    if form not in TRITON_FORMS:
        raise ValueError(f"{TRITON_FORM_ENV}={form!r}: choose one of {TRITON_FORMS}")
    if form == "recurrent":
        from undertow.kernels.mlstm.triton import mlstm_triton

        return mlstm_triton(*args, **kwargs)
    from undertow.kernels.mlstm.triton_chunk import mlstm_triton_chunk

    return mlstm_triton_chunk(*args, **kwargs)


IMPLEMENTATIONS = {"reference": mlstm_reference, "chunked": mlstm_chunked}
if triton_available():
    IMPLEMENTATIONS["triton"] = _mlstm_triton


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: State | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
):
    """q, k: (B, T, H, Dqk); v: (B, T, H, Dv); i, f: (B, T, H) gate pre-activations (soft-capped by
    the caller); q is scaled by 1/sqrt(Dqk) inside. initial_state: (C (B, H, Dqk, Dv), n (B, H, Dqk),
    m (B, H)) float32, None for the zero state (0, 0, 0); doc_ids: (B, T), the state resets where it
    changes. `chunk_size` is used by the chunked and Triton forms.
    Returns h (B, T, H, Dv) in q's dtype [, final_state (C, n, m)]."""
    handler = context_parallel_op("mlstm", STATE_PASSING)
    if handler is not None:  # context parallelism: this rank's slice, states passed between ranks
        return handler(mlstm, q, k, v, i, f, eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                       doc_ids=doc_ids, return_final_state=return_final_state, backend=backend)
    chosen = select_backend("mlstm", q, backend, tuple(IMPLEMENTATIONS))
    kwargs = dict(eps=eps, initial_state=initial_state, doc_ids=doc_ids, return_final_state=return_final_state)
    if chosen != "reference":
        kwargs["chunk_size"] = chunk_size
    return IMPLEMENTATIONS[chosen](q, k, v, i, f, **kwargs)
