"""The one seam between the single-device kernels and context parallelism (CP).

A recurrence op's public function (ssd, selective_scan, causal_conv1d, ...) starts with

    handler = context_parallel_op("ssd", STATE_PASSING)      # STATE_PASSING: kernels/ssd/context.py
    if handler is not None:
        return handler(ssd, x, dt, ..., doc_ids=doc_ids, ...)

an op whose state after a slice is a nonlinear function of the state before it (sLSTM) passes a
`SerialPassing` instead, an op that solves its nonlinear recurrence by linear systems spanning the
ranks (ParaRNN's Newton solver) a `SpanningSolve`, and an op whose CP form is not state passing
(attention) names only itself. Outside CP `context_parallel_op` returns None and the kernel runs as always. Inside a block that
`parallel.context.apply_context_parallel` wrapped, it returns the handler that parallel/ installed,
bound to the active context (and to the op's `StatePassing`); the handler calls the kernel back for
its local slice inside `local_only()`, where the seam is closed again.

Who owns what (imports run down the house, parallel -> kernels):
- kernels/<op>/context.py: the op's state math, a `StatePassing` (how a slice's final state depends
  on its initial state) or a `SerialPassing` (the shapes of its state), next to the op; a new
  recurrence op adds that file and the call above;
- this module: the hook point, the `StatePassing` / `SerialPassing` contracts and the table of
  installed handlers;
- parallel/: installs the handlers (`install_handler`) and does the communication, for every op.

The active context is a ContextVar, set around each wrapped block's forward (also when activation
checkpointing recomputes it), so a model without CP in the same process is never affected.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

STATE_PASSING = "state_passing"  # the handler kind of every op that declares a StatePassing
SERIAL = "serial"  # the handler kind of every op that declares a SerialPassing
SPANNING = "spanning"  # the handler kind of every op that declares a SpanningSolve

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("undertow_context_parallel", default=None)
_HANDLERS: dict[str, Callable[..., Any]] = {}


@dataclass(frozen=True)
class StatePassing:
    """How one recurrence op passes its state across cp ranks: its state after a slice is affine in
    its state before it, final_state(h0) = transition * h0 + final_state(0) (* broadcasts).

    transition(args, kwargs) -> float32 tensor broadcastable to the state: the slice's cumulative
        transition, zero for rows in which a document starts after the slice's first token. May
        raise if the slice is too short.
    final_from_zero(fn, args, kwargs) -> final_state(0) of the slice, float32, the state's shape.
        Without it, the op runs once more from a zero state to get it.
    args/kwargs are the op's positional inputs and the keywords its public function forwards.
    combine(prev, final, transition) -> the slice's final state from its initial state `prev`, for an
        op whose state is affine only in a form it does not store (the mLSTM keeps C and n scaled by
        exp(-m) and m a running max: kernels/mlstm/context.py). Then the state is a tuple of tensors,
        final_from_zero (required) gives the slice's final state with no contribution of its initial
        state (the identity of combine), transition is whatever combine reads, and the zero state
        (a row's or a document's start) is all zeros. None: final + transition * prev.
    """

    transition: Callable[[tuple, dict], Any]
    final_from_zero: Callable[[Callable, tuple, dict], Any] | None = None
    combine: Callable[[Any, Any, Any], Any] | None = None

    def __post_init__(self):
        if self.combine is not None and self.final_from_zero is None:
            raise ValueError("a StatePassing with a combine needs final_from_zero: the op's own run from its "
                             "zero state includes that state's contribution")


@dataclass(frozen=True)
class SerialPassing:
    """How a recurrence op whose state after a slice is a nonlinear function of the state before it
    passes that state across cp ranks: serially, rank r runs its slice from the state rank r - 1
    sends it (and in the backward the state's gradient travels back the same way).

    state_shapes(args, kwargs) -> the shapes of the op's state tensors for this slice's rows (what
        a rank receives before it runs); the op takes and returns its state as a tuple of them.
    """

    state_shapes: Callable[[tuple, dict], list[tuple[int, ...]]]


@dataclass(frozen=True)
class SpanningSolve:
    """How an op solves its recurrence over the whole split sequence itself, talking to the other cp
    ranks through `links` (an iterative solver whose every step is a linear system spanning the
    ranks: kernels/pararnn/context.py). The op owns the math and the autograd; parallel/ provides
    the communication.

    solve(links, args, kwargs) -> what the op's public function returns. `links` has `rank`,
    `world` and `all_gather(tensor) -> [every rank's tensor, in rank order]` (same shape and dtype
    on every rank, no autograd; every rank must call it the same number of times).
    """

    solve: Callable[[Any, tuple, dict], Any]


def install_handler(kind: str, handler: Callable[..., Any]) -> None:
    """Install the CP form of an op (kind = its name), of every state-passing op (kind =
    STATE_PASSING), of every serially passing op (kind = SERIAL) or of every op that solves across the
    ranks itself (kind = SPANNING): `handler(cp, fn, *args, **kwargs)`, or `handler(cp, spec, fn,
    *args, **kwargs)` for STATE_PASSING, SERIAL and SPANNING. Installing the same
    handler again is a no-op; a different one raises."""
    if _HANDLERS.get(kind, handler) is not handler:
        raise ValueError(f"a different context-parallel handler for {kind!r} is installed already")
    _HANDLERS[kind] = handler


def context_parallel_op(op: str, state_passing: StatePassing | SerialPassing | SpanningSolve | None = None) -> Callable[..., Any] | None:
    """The CP handler of `op` bound to the active context, or None when CP is not active here."""
    cp = _ACTIVE.get()
    if cp is None:
        return None
    kinds = {SerialPassing: SERIAL, SpanningSolve: SPANNING, StatePassing: STATE_PASSING}
    kind = op if state_passing is None else kinds[type(state_passing)]
    handler = _HANDLERS.get(kind)
    if handler is None:
        raise RuntimeError(
            f"{op} runs under context parallelism but no context-parallel handler for {kind!r} is installed "
            f"(installed: {sorted(_HANDLERS)}); a recurrence op passes its StatePassing, SerialPassing or SpanningSolve "
            "(kernels/<op>/context.py)")
    if state_passing is not None:
        return functools.partial(handler, cp, state_passing)
    return functools.partial(handler, cp)


@contextlib.contextmanager
def active(cp: Any) -> Iterator[None]:
    """Make `cp` the context of the ops run inside (None: plain single-device ops)."""
    token = _ACTIVE.set(cp)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def local_only() -> contextlib.AbstractContextManager:
    """Run kernels on the local slice only (what a handler does when it calls the kernel back)."""
    return active(None)
