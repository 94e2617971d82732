"""Titans' neural long-term memory (arXiv 2501.00663) with document resets and carried state; the
update rule (loss, momentum, retention, the Omega window, clipping) is rule.UpdateRule. See
reference.py (the spec) and chunked.py (the parallel form)."""

from __future__ import annotations

import torch

from undertow.kernels.context import context_parallel_op
from undertow.kernels.dispatch import select_backend, triton_available
from undertow.kernels.titans_memory.chunked import titans_memory_chunked
from undertow.kernels.titans_memory.context import SERIAL_STATE, run_serial_memory
from undertow.kernels.titans_memory.reference import start_state, titans_memory_reference
from undertow.kernels.titans_memory.rule import MemoryState, UpdateRule, memory_forward
from undertow.kernels.titans_memory.triton_linear import titans_memory_triton, usable

__all__ = ["titans_memory", "MemoryState", "UpdateRule", "memory_forward", "start_state", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = {"reference": titans_memory_reference, "chunked": titans_memory_chunked}
if triton_available():  # the linear memory on CUDA (triton_linear.py; kernels imported on first use)
    IMPLEMENTATIONS["triton"] = titans_memory_triton


def titans_memory(q, k, v, theta, eta, alpha, init_weights, *, gamma=None, rule: UpdateRule = UpdateRule(),
                  chunk_size: int = 64, initial_state: MemoryState | None = None, doc_ids=None,
                  return_final_state: bool = False, recompute: bool = False, backend: str | None = None):
    """q, k (B, T, H, Dk) (normalised by the caller); v (B, T, H, Dv); theta (inner learning rate, already
    times its max), eta (momentum), alpha (forgetting), gamma (Omega gates; None = 1): (B, T, H) in [0, 1];
    init_weights: the heads' M_0, W_1..W_L of shapes (H, Din_l, Dout_l) (L = 1 linear, L >= 2 residual MLP);
    initial_state: the MemoryState a row starts from (None: M_0, zero momentum); doc_ids (B, T): the memory
    restarts from M_0 where it changes. Gradients are taken at the weights of each chunk's start
    (chunk_size, the paper's parallel training; 1 = token by token), in both backends.
    Returns y (B, T, H, Dv) in q's dtype [, final MemoryState (float32)]. Under context parallelism
    (context.py) the state passes serially from rank to rank; each slice must hold whole chunks."""
    handler = context_parallel_op("titans_memory", SERIAL_STATE)
    if handler is not None:
        return run_serial_memory(handler, titans_memory, q, k, v, theta, eta, alpha, init_weights, gamma=gamma,
                                 rule=rule, chunk_size=chunk_size, initial_state=initial_state, doc_ids=doc_ids,
                                 return_final_state=return_final_state, recompute=recompute, backend=backend)
    chosen = select_backend("titans_memory", q, backend, usable(IMPLEMENTATIONS, q, init_weights, rule, backend))
    kwargs = dict(gamma=gamma, rule=rule, chunk_size=chunk_size, initial_state=initial_state, doc_ids=doc_ids,
                  return_final_state=return_final_state)
    if chosen == "chunked":
        kwargs["recompute"] = recompute
    return IMPLEMENTATIONS[chosen](q, k, v, theta, eta, alpha, tuple(init_weights), **kwargs)
