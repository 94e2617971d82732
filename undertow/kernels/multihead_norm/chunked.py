"""xLSTM's gated per-head norm on CPU: one native pass over each token forward and one backward
(native_multihead_norm.cpp), saving h, o and the float32 mean and 1/std per head. Where the native
loop does not apply (not CPU float32 throughout, tensor subclasses, inside torch.compile, no gate,
several torch threads without torch's OpenMP runtime in the library, or no library;
kernels/native.py `elementwise_parts`) this is the reference and autograd. `ENABLED = False` (tests) or UNDERTOW_NATIVE=0
keeps to PyTorch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from undertow.kernels import native
from undertow.kernels.multihead_norm.reference import multihead_norm_reference

NAME = "multihead_norm"
SOURCE = Path(__file__).with_name("native_multihead_norm.cpp")
ENABLED = True
MIN_ROWS = 256  # tokens per thread at least

_P, _I = ctypes.c_void_p, ctypes.c_int64


def _library():
    library = native.load(NAME, SOURCE, openmp=True)
    if library is not None and library.mhnorm_fwd.argtypes is None:
        library.mhnorm_fwd.argtypes = [_P, _P, _I] + [_P] * 5 + [_I, _I, ctypes.c_float, _I, ctypes.c_int]
        library.mhnorm_bwd.argtypes = [_P, _P, _I] + [_P] * 8 + [_I] * 3 + [ctypes.c_int]
        library.mhnorm_fwd.restype = library.mhnorm_bwd.restype = ctypes.c_int
    return library


def _gate_rows(o: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, int]:
    """o as (rows, width) with a row stride (a slice of a wider projection needs no copy)."""
    o2 = o.reshape(rows, width)
    if o2.stride(1) != 1:
        o2 = o2.contiguous()
    return o2, o2.stride(0)


class _GatedMultiHeadNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, o, eps):
        H, Dv = h.shape[-2:]
        rows = h.numel() // (H * Dv)
        h2 = h.reshape(rows, H * Dv).contiguous()
        o2, ld = _gate_rows(o, rows, H * Dv)
        w = weight.contiguous()
        y = torch.empty(rows, H * Dv, dtype=torch.float32)
        mean, rstd = torch.empty(rows, H), torch.empty(rows, H)
        parts = native.elementwise_parts(NAME, rows, MIN_ROWS)
        buffer = torch.empty(parts, Dv)
        _library().mhnorm_fwd(h2.data_ptr(), o2.data_ptr(), ld, w.data_ptr(), y.data_ptr(), mean.data_ptr(),
                              rstd.data_ptr(), buffer.data_ptr(), H, Dv, eps, rows, parts)
        ctx.save_for_backward(h2, o2, w, mean, rstd)
        ctx.shapes = (h.shape, o.shape, ld)
        return y.view(o.shape)

    @staticmethod
    def backward(ctx, dy):
        h2, o2, w, mean, rstd = ctx.saved_tensors
        h_shape, o_shape, ld = ctx.shapes
        rows, width = h2.shape
        H, Dv = h_shape[-2:]
        need_h, need_w, need_o = ctx.needs_input_grad[:3]
        dy = dy.reshape(rows, width).contiguous().float()
        dh = torch.empty(rows, width) if need_h else None
        d_o = torch.empty(rows, width) if need_o else None
        parts = native.elementwise_parts(NAME, rows, MIN_ROWS) or 1  # one piece if the threads changed since
        dw = torch.zeros(parts, width)
        buffer = torch.empty(parts, 2 * Dv)
        _library().mhnorm_bwd(h2.data_ptr(), o2.data_ptr(), ld, w.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                              dy.data_ptr(), native.pointer(dh), native.pointer(d_o), dw.data_ptr(), buffer.data_ptr(),
                              H, Dv, rows, parts)
        return (dh.view(h_shape) if need_h else None, dw.sum(0) if need_w else None,
                d_o.view(o_shape) if need_o else None, None)


def multihead_norm_chunked(h: torch.Tensor, weight: torch.Tensor, eps: float, o: torch.Tensor | None = None):
    """Same signature and results as `multihead_norm_reference`."""
    if (ENABLED and o is not None and h.numel() > 0 and o.shape[:-1] == h.shape[:-2]
            and o.shape[-1] == h.shape[-2] * h.shape[-1] == weight.numel()
            and native.plain_cpu_float32(h, weight, o) and _library() is not None
            and native.elementwise_parts(NAME, h.numel() // weight.numel(), MIN_ROWS) is not None):
        return _GatedMultiHeadNorm.apply(h, weight, o, eps)
    return multihead_norm_reference(h, weight, eps, o)
