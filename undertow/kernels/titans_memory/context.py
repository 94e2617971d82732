"""Context parallelism of the Titans memory: its state passed serially from cp rank to cp rank.

The state after a slice is not affine in the state before it (each inner gradient is taken at the
memory's own weights, then clipped), so it cannot be composed from per-rank summaries like a linear
scan's: the op declares a SerialPassing (kernels/context.py) and parallel/context_serial.py runs the
slices rank after rank, rank r from the state rank r - 1 ends with (the backward mirrors it).

What travels is the whole MemoryState as a flat tuple of float32 tensors,
    (W_1..W_L, S_1..S_L [, window k (B, c-1, H, Dk), v (B, c-1, H, Dv), gamma (B, c-1, H)], live (B,))
weights and momentum (B, H, Din_l, Dout_l). `live` is 1 when sent; the receiving side zeroes a row's
state where a document starts at its first token, so live = 0 marks the rows that restart from the
learned M_0 with zero momentum (a zero memory is not the memory's start, unlike a scan's zero state).

Chunks: the chunk-start rule counts chunks from each call's first token, so a slice equals its part
of the single-process run only when it holds whole chunks (T_local a multiple of chunk_size);
anything else is refused here (models refuse it at config load).
"""

from __future__ import annotations

import torch

from undertow.kernels.context import SerialPassing
from undertow.kernels.titans_memory.reference import start_state
from undertow.kernels.titans_memory.rule import MemoryState, UpdateRule


def flat_shapes(B: int, init_weights, rule: UpdateRule, H: int, Dk: int, Dv: int) -> list[tuple[int, ...]]:
    """The shapes of the flat state (module docstring) for B rows; init_weights (H, Din_l, Dout_l)."""
    weights = [(B, *w.shape[-3:]) for w in init_weights]
    c = rule.window
    window = [(B, c - 1, H, Dk), (B, c - 1, H, Dv), (B, c - 1, H)] if c > 1 else []
    return weights + weights + window + [(B,)]


def flatten(state: MemoryState) -> tuple[torch.Tensor, ...]:
    """MemoryState -> the flat tuple, live = 1 on every row."""
    rows = state.weights[0].shape[0]
    live = state.weights[0].new_ones(rows, dtype=torch.float32)
    return (*state.weights, *state.momentum, *(state.window or ()), live)


def unflatten(flat, init_weights, rule: UpdateRule, k: torch.Tensor, v: torch.Tensor) -> MemoryState:
    """The flat tuple -> MemoryState; rows with live = 0 get the start state (M_0, zero momentum, an
    empty window), whose gradient reaches init_weights."""
    L = len(init_weights)
    live = flat[-1] > 0
    B = live.shape[0]
    fresh = start_state(tuple(init_weights), B, k, v, rule, torch.float32)
    pick = lambda a, b: torch.where(live.view(-1, *[1] * (a.ndim - 1)), a, b.to(a.dtype))  # noqa: E731
    weights = tuple(pick(a, b) for a, b in zip(flat[:L], fresh.weights))
    momentum = tuple(pick(a, b) for a, b in zip(flat[L:2 * L], fresh.momentum))
    window = tuple(pick(a, b) for a, b in zip(flat[2 * L:2 * L + 3], fresh.window)) if rule.window > 1 else None
    return MemoryState(weights, momentum, window)


def _state_shapes(args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    q, _, v, *_ = args
    B, _, H, Dk = q.shape
    return flat_shapes(B, args[6], kwargs.get("rule", UpdateRule()), H, Dk, v.shape[3])


SERIAL_STATE = SerialPassing(state_shapes=_state_shapes)


def _run_flat(fn, q, k, v, theta, eta, alpha, init_weights, *, initial_state=None, return_final_state=True,
              **kwargs):
    """fn (the kernel) with the state as the flat tuple, in and out (what context_serial passes)."""
    rule = kwargs.get("rule", UpdateRule())
    start = None if initial_state is None else unflatten(initial_state, init_weights, rule, k, v)
    y, final = fn(q, k, v, theta, eta, alpha, init_weights, initial_state=start, return_final_state=True, **kwargs)
    return y, flatten(final)


def run_serial_memory(handler, fn, q, k, v, theta, eta, alpha, init_weights, **kwargs):
    """The kernel `fn` under context parallelism through `handler` (context_parallel_op's, bound to
    SERIAL_STATE): checks that the slice holds whole chunks, passes the state flat, returns what fn
    returns (y [, the state after this rank's slice])."""
    T, C = q.shape[1], kwargs.get("chunk_size", 64)
    if T % C:
        raise ValueError(f"titans_memory under context parallelism: a cp slice of {T} tokens cuts a memory chunk "
                         f"of {C}; the slice must hold whole chunks (seq_len / cp a multiple of chunk_size)")
    wanted = kwargs.pop("return_final_state", False)
    if kwargs.get("initial_state") is not None:
        kwargs["initial_state"] = flatten(kwargs["initial_state"])
    out = handler(lambda *a, **kw: _run_flat(fn, *a, **kw), q, k, v, theta, eta, alpha, tuple(init_weights),
                  return_final_state=wanted, **kwargs)
    if not wanted:
        return out
    y, flat = out
    return y, unflatten(flat, init_weights, kwargs.get("rule", UpdateRule()), k, v)
