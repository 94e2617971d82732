"""The chunked form's forward on CPU as a native loop (native_scan.cpp; built by kernels/native.py).

`native_forward` returns what `_ScanCore.forward`'s PyTorch loop computes: y, the state before
every chunk (for the backward, which recomputes a chunk from it) and the final state.
`native_inference` runs the whole op (softplus, D skip, z gate included) for calls that need no
gradient. Both return None where the loop does not apply (not CPU, d_state over 256, empty
input, or no library), and the PyTorch forms run. Set `ENABLED = False` (tests) or
UNDERTOW_NATIVE=0 to keep to PyTorch.
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
_ARGTYPES = [_P, _P, _P, ctypes.c_int32] + [_P] * 10 + [_I] * 5 + [ctypes.c_float] + [_I, _I]


def _library():
    library = native.load(NAME, SOURCE)
    if library is not None and library.selective_scan_fwd.argtypes is None:
        library.selective_scan_fwd.argtypes = _ARGTYPES
        library.selective_scan_fwd.restype = ctypes.c_int
    return library


def applies(u: torch.Tensor, A: torch.Tensor) -> bool:
    return ENABLED and u.device.type == "cpu" and u.numel() > 0 and 0 < A.shape[1] <= MAX_N


@torch.compiler.disable  # raw pointers: torch.compile must run this eagerly, never trace it
def _run(u, delta, bias, softplus: bool, A, B, C, D, z, h0, starts, chunk: int | None, tiny_decay: float):
    """One call of the library over every row; float32 copies where needed. Returns
    (y, incoming or None, final) or None without a library."""
    library = _library()
    if library is None:
        return None
    Bt, T, Dc = u.shape
    N = A.shape[1]
    f32 = [None if t is None else t.float().contiguous() for t in (u, delta, bias, B, C, D, z, h0)]
    u, delta, bias, B, C, D, z, h0 = f32
    A2 = (A.float().t() * LOG2_E).contiguous()
    starts = starts.to(torch.uint8).contiguous()
    y = u.new_empty(Bt, T, Dc)
    incoming = None if chunk is None else u.new_empty(-(-T // chunk), Bt, N, Dc)
    final = u.new_empty(Bt, N, Dc)
    pointers = [None if t is None else t.data_ptr() for t in (u, delta, bias)] + [int(softplus)]
    pointers += [None if t is None else t.data_ptr() for t in (A2, B, C, D, z, h0, starts, y, incoming, final)]
    scalars = [Bt, T, Dc, N, chunk or T, math.log2(tiny_decay)]
    failed = []

    def rows(begin: int, end: int) -> None:
        if library.selective_scan_fwd(*pointers, *scalars, begin, end):
            failed.append((begin, end))

    native.run_rows(rows, Bt * -(-Dc // BLOCK))
    if failed:
        raise RuntimeError(f"selective_scan native forward refused rows {failed} (d_state {N} > {MAX_N}?)")
    return y, incoming, final


def native_forward(u, dt, A, B, C, h0, starts, chunk: int, tiny_decay: float):
    """The training path's recurrence. u, dt: (Bt, T, Dc); A: (Dc, N); B, C: (Bt, T, N);
    h0: (Bt, N, Dc); starts: (Bt, T) bool; float32 on CPU. Returns (y (Bt, T, Dc),
    incoming (ceil(T / chunk), Bt, N, Dc), final (Bt, N, Dc)) or None (the PyTorch loop runs)."""
    if not applies(u, A) or u.dtype != torch.float32:
        return None
    return _run(u, dt, None, False, A, B, C, None, None, h0, starts, chunk, tiny_decay)


def native_inference(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, h0, starts, tiny_decay: float):
    """The whole op without autograd (softplus, D skip and z gate inside the loop), for calls
    that need no gradient. h0: (Bt, N, Dc). Returns (y float32 (Bt, T, Dc), final (Bt, N, Dc))
    or None."""
    if not applies(u, A):
        return None
    done = _run(u, delta, delta_bias, delta_softplus, A, B, C, D, z, h0, starts, None, tiny_decay)
    return None if done is None else (done[0], done[2])
