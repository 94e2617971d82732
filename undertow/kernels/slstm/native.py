"""sLSTM's CPU loops in C++ (native_slstm.cpp; built by kernels/native.py).

`native_forward` runs the recurrence and keeps every step's state for the backward;
`native_backward` is its exact adjoint. Both return None where the loops do not apply (not
CPU, empty input, or no library), and the caller runs the PyTorch loop. Set `ENABLED = False`
(tests) or UNDERTOW_NATIVE=0 to keep to PyTorch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from undertow.kernels import native

NAME = "slstm"
SOURCE = Path(__file__).with_name("native_slstm.cpp")
ENABLED = True

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FWD_ARGS = [_P] * 9 + [_I] * 6
_BWD_ARGS = [_P] * 13 + [_I] * 6


def _library():
    library = native.load(NAME, SOURCE)
    if library is not None and library.slstm_fwd.argtypes is None:
        for fn, args in ((library.slstm_fwd, _FWD_ARGS), (library.slstm_bwd, _BWD_ARGS)):
            fn.argtypes, fn.restype = args, ctypes.c_int
    return library


def applies(gates: torch.Tensor) -> bool:
    return ENABLED and gates.device.type == "cpu" and gates.numel() > 0


def _contiguous(gates, R, init, starts):
    """What the loops read through raw pointers: contiguous, starts as uint8."""
    init = None if init is None else init.contiguous()
    return gates.contiguous(), R.contiguous(), init, starts.to(torch.uint8).contiguous()


def _run(fn, args_for, rows: int) -> None:
    def call(begin: int, end: int, index: int) -> None:
        if fn(*args_for(index), begin, end):
            raise RuntimeError("sLSTM native loop failed")

    native.run_parts(call, native.parts(rows))


@torch.compiler.disable  # raw pointers: torch.compile must run this eagerly, never trace it
def native_forward(gates: torch.Tensor, R: torch.Tensor, init: torch.Tensor | None, starts: torch.Tensor,
                   keep_states: bool = True):
    """gates (B, T, 4, H, D), R (4, H, D, D), init (4, B, H, D) or None, starts (B, T) bool; float32
    on CPU. Returns (states (4, B, T, H, D): y, c, n, m after every step, final (4, B, H, D)) or None;
    without `keep_states` (no backward to come) only y is written: states (1, B, T, H, D)."""
    library = _library() if applies(gates) else None
    if library is None:
        return None
    B, T, _, H, D = gates.shape
    gates, R, init, starts = _contiguous(gates, R, init, starts)
    states, final = gates.new_empty(4 if keep_states else 1, B, T, H, D), gates.new_empty(4, B, H, D)
    per_step = list(states) if keep_states else [states[0], None, None, None]
    args = native.pointers(gates, R, init, starts, *per_step, final) + [B, T, H, D]  # the tensors stay alive here
    _run(library.slstm_fwd, lambda index: args, H)  # one unit per head: its batch entries step together
    return states, final


@torch.compiler.disable
def native_backward(gates, R, init, starts, states, dy, dfinal):
    """The adjoint of `native_forward` from its `states`. dy (B, T, H, D); dfinal (4, B, H, D) or None.
    Returns (dgates (B, T, 4, H, D), dR (4, H, D, D), dinit (4, B, H, D)) or None."""
    library = _library() if applies(gates) else None
    if library is None:
        return None
    B, T, _, H, D = gates.shape
    gates, R, init, starts = _contiguous(gates, R, init, starts)
    dy = dy.float().contiguous()
    dfinal = None if dfinal is None else dfinal.float().contiguous()
    dgates, dinit = gates.new_empty(B, T, 4, H, D), gates.new_empty(4, B, H, D)
    ranges = native.parts(B * H)
    dR = gates.new_zeros(len(ranges), *R.shape)  # one accumulator per part: rows of a head share dR
    head = native.pointers(gates, R, init, starts, *states, dy, dfinal, dgates, dinit)

    def call(begin: int, end: int, index: int) -> None:
        if library.slstm_bwd(*head, dR[index].data_ptr(), B, T, H, D, begin, end):
            raise RuntimeError("sLSTM native loop failed")

    native.run_parts(call, ranges)
    return dgates, dR.sum(0), dinit
