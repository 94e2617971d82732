"""SwiGLU's activation on CPU: one native pass forward and one backward (native_swiglu.cpp), saving
only g and u, over torch's threads where the library shares torch's OpenMP runtime. Where the native
loop does not apply (not CPU float32, tensor subclasses such as DTensor, inside torch.compile, which
fuses the reference's ops itself, several torch threads without that runtime, or no library;
kernels/native.py `elementwise_parts`) this is the reference and autograd. `ENABLED = False` (tests) or UNDERTOW_NATIVE=0 keeps to PyTorch.

("chunked" is the name of every op's CPU form, kernels/dispatch.py; this one needs no chunks.)
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from undertow.kernels import native
from undertow.kernels.swiglu.reference import swiglu_reference

NAME = "swiglu"
SOURCE = Path(__file__).with_name("native_swiglu.cpp")
ENABLED = True
MIN_PART = 1 << 15  # elements per thread at least

_P, _I = ctypes.c_void_p, ctypes.c_int64


def _library():
    library = native.load(NAME, SOURCE, openmp=True)
    if library is not None and library.swiglu_fwd.argtypes is None:
        library.swiglu_fwd.argtypes, library.swiglu_fwd.restype = [_P] * 3 + [_I, ctypes.c_int], ctypes.c_int
        library.swiglu_bwd.argtypes, library.swiglu_bwd.restype = [_P] * 5 + [_I, ctypes.c_int], ctypes.c_int
    return library


def applies(g: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether the native loops run for (g, u) (the library is built on the first call that asks)."""
    return (ENABLED and g.shape == u.shape and g.numel() > 0 and native.plain_cpu_float32(g, u)
            and _library() is not None and native.elementwise_parts(NAME, g.numel(), MIN_PART) is not None)


def _run(fn, tensors: list[torch.Tensor]) -> None:
    n = tensors[0].numel()
    fn(*(t.data_ptr() for t in tensors), n, native.elementwise_parts(NAME, n, MIN_PART) or 1)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        out = torch.empty_like(g)
        _run(_library().swiglu_fwd, [g, u, out])
        ctx.save_for_backward(g, u)
        return out

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous().float()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _run(_library().swiglu_bwd, [g, u, dy, dg, du])
        return dg, du


def swiglu_chunked(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Same signature and results as `swiglu_reference`."""
    if applies(g, u):
        return _SwiGLU.apply(g, u)
    return swiglu_reference(g, u)
