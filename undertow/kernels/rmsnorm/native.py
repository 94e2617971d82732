"""RMSNorm's forward and backward on CPU in C++ (native_rmsnorm.cpp, built by kernels/native.py): one
pass over each row each way. `forward` and `backward` return None where the loops do not apply
(not CPU float32 throughout, tensor subclasses, inside torch.compile, empty input, several torch
threads without torch's OpenMP runtime in the library, or no library; kernels/native.py
`elementwise_parts`),
and the caller runs the PyTorch form. `ENABLED = False` (tests) or UNDERTOW_NATIVE=0 keeps to PyTorch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from undertow.kernels import native

NAME = "rmsnorm"
SOURCE = Path(__file__).with_name("native_rmsnorm.cpp")
ENABLED = True
MIN_ROWS = 256  # rows per thread at least

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _library():
    library = native.load(NAME, SOURCE, openmp=True)
    if library is not None and library.rmsnorm_fwd.argtypes is None:
        library.rmsnorm_fwd.argtypes = [_P] * 6 + [_I, _I, _F, _I, ctypes.c_int]
        library.rmsnorm_bwd.argtypes = [_P] * 9 + [_I] * 3 + [ctypes.c_int]
        library.rmsnorm_fwd.restype = library.rmsnorm_bwd.restype = ctypes.c_int
    return library


def applies(x2: torch.Tensor, *others: torch.Tensor | None) -> bool:
    return (ENABLED and x2.numel() > 0 and native.plain_cpu_float32(x2, *others) and _library() is not None
            and native.elementwise_parts(NAME, x2.shape[0], MIN_ROWS) is not None)


def forward(x2, z2, weight, group: int, eps: float):
    """x2, z2 (rows, dim) -> (out (rows, dim), rstd (rows, dim / group)), or None (not applicable)."""
    if not applies(x2, z2, weight):
        return None
    x2, weight = x2.contiguous(), weight.contiguous()
    z2 = z2.contiguous() if z2 is not None else None
    rows, dim = x2.shape
    out = torch.empty_like(x2)
    rstd = torch.empty(rows, dim // group, dtype=torch.float32)
    parts = native.elementwise_parts(NAME, rows, MIN_ROWS)
    buffer = torch.empty(parts, dim, dtype=torch.float32)
    _library().rmsnorm_fwd(*native.pointers(x2, z2, weight, out, rstd, buffer), dim, group, eps, rows, parts)
    return out, rstd


def backward(x2, z2, weight, rstd, dout2, group: int, need_x: bool, need_z: bool):
    """(dx or None, dz or None, dweight float32) of forward's inputs, or None (not applicable)."""
    if not applies(x2, z2, weight, dout2):
        return None
    x2, weight, dout2 = x2.contiguous(), weight.contiguous(), dout2.contiguous()
    z2 = z2.contiguous() if z2 is not None else None
    rows, dim = x2.shape
    dx = torch.empty_like(x2) if need_x else None
    dz = torch.empty_like(x2) if need_z and z2 is not None else None
    parts = native.elementwise_parts(NAME, rows, MIN_ROWS)
    dw = torch.zeros(parts, dim, dtype=torch.float32)
    buffer = torch.empty(parts, 2 * dim, dtype=torch.float32)
    _library().rmsnorm_bwd(*native.pointers(x2, z2, weight, dout2, rstd, dx, dz, dw, buffer), dim, group, rows, parts)
    return dx, dz, dw.sum(0)
