"""The chunked form's CPU loops in C++ (native_scan.cpp; built by kernels/native.py).

`native_forward` returns what `_ScanCore.forward`'s PyTorch loop computes: y, the state before
every chunk and the final state; `native_backward` is its backward from those states (all
gradients of u, dt, A, B, C and the initial state). `native_inference` runs the whole op
(softplus, D skip, z gate included) for calls that need no gradient. Each returns None where the
loops do not apply (not CPU, d_state over 256, empty input, or no library), and the PyTorch
forms run. Set `ENABLED = False` (tests) or UNDERTOW_NATIVE=0 to keep to PyTorch.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from undertow.kernels import native

NAME = "selective_scan"
SOURCE = Path(__file__).with_name("native_scan.cpp")
MAX_N = 256
BLOCK = 16  # channels per row, W in native_scan.cpp
LOG2_E = 1.4426950408889634
ENABLED = True

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FWD_ARGS = [_P, _P, _P, ctypes.c_int32] + [_P] * 10 + [_I] * 5 + [ctypes.c_float, ctypes.c_int32] + [_I, _I]
_BWD_ARGS = [_P] * 15 + [_I] * 5 + [ctypes.c_float, ctypes.c_int32] + [_I, _I]
_ERRORS = {1: f"d_state over {MAX_N}", 2: "out of memory"}


def _library():
    library = native.load(NAME, SOURCE)
    if library is not None and library.selective_scan_fwd.argtypes is None:
        for fn, args in ((library.selective_scan_fwd, _FWD_ARGS), (library.selective_scan_bwd, _BWD_ARGS)):
            fn.argtypes, fn.restype = args, ctypes.c_int
    return library


def _run_rows(fn, args_for, ranges: list[tuple[int, int]]) -> None:
    """fn(*args_for(part), begin, end) for each (begin, end) of `ranges`, on parallel threads."""
    failed = []

    def call(begin: int, end: int, index: int) -> None:
        code = fn(*args_for(index), begin, end)
        if code:
            failed.append(_ERRORS.get(code, f"error {code}"))

    native.run_parts(call, ranges)
    if failed:
        raise RuntimeError(f"selective_scan native loop failed: {failed[0]}")


def applies(u: torch.Tensor, A: torch.Tensor) -> bool:
    return ENABLED and u.device.type == "cpu" and u.numel() > 0 and 0 < A.shape[1] <= MAX_N


def _rows(Bt: int, Dc: int) -> int:
    return Bt * -(-Dc // BLOCK)


def _a2(A: torch.Tensor) -> torch.Tensor:
    return (A.float().t() * LOG2_E).contiguous()


def may_grow(A: torch.Tensor, dt_floor: float | None) -> int:
    """0 when every dt * A is <= 0 for sure (A <= 0 and dt >= 0), which lets the loops skip
    exp2's overflow clamp; else 1. `dt_floor`: a lower bound of dt (None: dt is softplus's, >= 0)."""
    return 0 if bool(A.max() <= 0) and (dt_floor is None or dt_floor >= 0) else 1


def dt_floor(dt: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    """A lower bound of dt + bias (NaN if either holds a NaN, which keeps the clamp)."""
    return float(dt.min()) + (float(bias.min()) if bias is not None else 0.0)


@torch.compiler.disable  # raw pointers: torch.compile must run this eagerly, never trace it
def _forward(u, delta, bias, softplus: bool, A, B, C, D, z, h0, starts, chunk: int | None, tiny_decay: float,
             grow: int):
    """One call of the forward loop over every row; float32 copies where needed. `grow`: may_grow's
    flag. Returns (y, incoming or None, final) or None without a library."""
    library = _library()
    if library is None:
        return None
    Bt, T, Dc = u.shape
    N = A.shape[1]
    u, delta, bias, B, C, D, z, h0 = (None if t is None else t.float().contiguous() for t in (u, delta, bias, B, C, D, z, h0))
    starts = starts.to(torch.uint8).contiguous()
    y = u.new_empty(Bt, T, Dc)
    incoming = None if chunk is None else u.new_empty(-(-T // chunk), Bt, N, Dc)
    final = u.new_empty(Bt, N, Dc)
    A2 = _a2(A)  # kept alive while the library reads it (as every tensor behind a pointer here)
    args = (native.pointers(u, delta, bias) + [int(softplus)]
            + native.pointers(A2, B, C, D, z, h0, starts, y, incoming, final)
            + [Bt, T, Dc, N, chunk or T, math.log2(tiny_decay), grow])
    _run_rows(library.selective_scan_fwd, lambda index: args, native.parts(_rows(Bt, Dc)))
    return y, incoming, final


def native_forward(u, dt, A, B, C, h0, starts, chunk: int, tiny_decay: float, grow: int):
    """The training path's recurrence. u, dt: (Bt, T, Dc); A: (Dc, N); B, C: (Bt, T, N);
    h0: (Bt, N, Dc); starts: (Bt, T) bool; float32 on CPU; grow: may_grow(A, dt_floor(dt)), which
    the backward takes too. Returns (y (Bt, T, Dc), incoming (ceil(T / chunk), Bt, N, Dc),
    final (Bt, N, Dc)) or None (the PyTorch loop runs)."""
    if not applies(u, A) or u.dtype != torch.float32:
        return None
    return _forward(u, dt, None, False, A, B, C, None, None, h0, starts, chunk, tiny_decay, grow)


def native_inference(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, h0, starts, tiny_decay: float):
    """The whole op without autograd (softplus, D skip and z gate inside the loop), for calls
    that need no gradient. h0: (Bt, N, Dc). Returns (y float32 (Bt, T, Dc), final (Bt, N, Dc))
    or None."""
    if not applies(u, A):
        return None
    grow = may_grow(A, None if delta_softplus else dt_floor(delta, delta_bias))
    done = _forward(u, delta, delta_bias, delta_softplus, A, B, C, D, z, h0, starts, None, tiny_decay, grow)
    return None if done is None else (done[0], done[2])


@torch.compiler.disable
def native_backward(u, dt, A, B, C, starts, incoming, dy, dh_final, chunk: int, tiny_decay: float, grow: int):
    """The backward of `native_forward`, from its `incoming` states and with its `grow`. dy: (Bt, T, Dc);
    dh_final: (Bt, N, Dc) or None. Returns (du, ddt (Bt, T, Dc), dA (Dc, N), dB, dC (Bt, T, N),
    dh0 (Bt, N, Dc)) or None without a library."""
    library = _library() if applies(u, A) else None
    if library is None:
        return None
    Bt, T, Dc = u.shape
    N = A.shape[1]
    u, dt, B, C, dy = (t.contiguous() for t in (u, dt, B, C, dy))
    dh_final = None if dh_final is None else dh_final.contiguous()
    starts = starts.to(torch.uint8).contiguous()
    du, ddt, dh0 = torch.empty_like(u), torch.empty_like(u), u.new_empty(Bt, N, Dc)
    ranges = native.parts(_rows(Bt, Dc))
    # per part: dA, dB and dC accumulators (rows of different parts share their entries)
    dA, dB, dC = u.new_zeros(len(ranges), N, Dc), u.new_zeros(len(ranges), Bt, T, N), u.new_zeros(len(ranges), Bt, T, N)
    A2, incoming = _a2(A), incoming.contiguous()  # kept alive while the library reads them
    head = native.pointers(u, dt, A2, B, C, starts, incoming, dy, dh_final, du, ddt, dh0)
    tail = [Bt, T, Dc, N, chunk, math.log2(tiny_decay), grow]
    _run_rows(library.selective_scan_bwd, lambda i: head + native.pointers(dA[i], dB[i], dC[i]) + tail, ranges)
    return du, ddt, dA.sum(0).t(), dB.sum(0), dC.sum(0), dh0
