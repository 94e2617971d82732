"""The one seam between the single-device kernels and context parallelism (CP).

A kernel's public function (ssd, selective_scan, causal_conv1d, causal_attention) starts with

    handler = context_parallel_op("ssd")
    if handler is not None:
        return handler(ssd, x, dt, ..., doc_ids=doc_ids, ...)

Outside CP `context_parallel_op` returns None and the kernel runs as always. Inside a block that
`parallel.context.apply_context_parallel` wrapped, it returns the op's CP handler bound to the
active `ContextParallel`; the handler calls the kernel back for its local slice inside
`local_only()`, where the seam is closed again.

The active context is a ContextVar, set around each wrapped block's forward (also when activation
checkpointing recomputes it), so a model without CP in the same process is never affected.

This module must stay free of imports beyond the standard library: every kernel imports it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("undertow_context_parallel", default=None)
_HANDLERS: dict[str, Callable[..., Any]] = {}


def register_handler(op: str, handler: Callable[..., Any]) -> None:
    """`handler(cp, fn, *args, **kwargs)` runs op `op` (public function `fn`) on this rank's slice."""
    if op in _HANDLERS:
        raise ValueError(f"context-parallel handler for {op!r} is registered twice")
    _HANDLERS[op] = handler


def context_parallel_op(op: str) -> Callable[..., Any] | None:
    """The CP handler of `op` bound to the active context, or None when CP is not active here."""
    cp = _ACTIVE.get()
    if cp is None:
        return None
    handler = _HANDLERS.get(op)
    if handler is None:
        raise RuntimeError(
            f"{op} runs under context parallelism but has no context-parallel handler; "
            f"ops with one: {sorted(_HANDLERS)} (register one in undertow/parallel/context_ops.py)"
        )
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
