"""sLSTM's CPU form (the dispatch's "chunked" backend).

sLSTM is nonlinear in y (the recurrent matrix acts on y_{t-1} inside the gates), so no chunked-
parallel form exists: the fast form is a fused recurrent loop. On CPU that loop is C++
(native_slstm.cpp), forward and a hand-written backward (the exact adjoint of the forward, through
every step's saved state), wrapped in one autograd.Function. Where the loop cannot be built
(no compiler, UNDERTOW_NATIVE=0, other devices) the reference loop runs under autograd.
"""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import segment_starts
from undertow.kernels.slstm import native
from undertow.kernels.slstm.reference import slstm_reference


class _SLSTMLoop(torch.autograd.Function):
    """(gates, R, init (4, B, H, D) or None, starts, keep_states) -> (y (B, T, H, D), final (4, B, H, D)),
    float32. keep_states: a backward will follow (else only y per step is kept)."""

    @staticmethod
    def forward(ctx, gates, R, init, starts, keep_states):
        states, final = native.native_forward(gates, R, init, starts, keep_states=keep_states)
        ctx.save_for_backward(gates, R, init, starts, states)
        ctx.has_init = init is not None
        return states[0], final

    @staticmethod
    def backward(ctx, dy, dfinal):
        gates, R, init, starts, states = ctx.saved_tensors
        dgates, dR, dinit = native.native_backward(gates, R, init, starts, states, dy, dfinal)
        return dgates, dR, dinit if ctx.has_init else None, None, None


def slstm_chunked(
    gates: torch.Tensor,
    R: torch.Tensor,
    *,
    initial_state: tuple | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Same contract as `slstm_reference` (reference.py)."""
    if not native.applies(gates) or native._library() is None:
        return slstm_reference(gates, R, initial_state=initial_state, doc_ids=doc_ids,
                               return_final_state=return_final_state)
    B, T, _, H, D = gates.shape
    init = None if initial_state is None else torch.stack([s.float() for s in initial_state])
    starts = segment_starts(doc_ids, (B, T), gates.device)
    # contiguous here: the loops read raw pointers, in the forward and again in the backward
    leaves = (gates, R, *(initial_state or ()))
    keep_states = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    y, final = _SLSTMLoop.apply(gates.float().contiguous(), R.float().contiguous(), init, starts, keep_states)
    y = y.to(gates.dtype)
    return (y, tuple(final.unbind(0))) if return_final_state else y
