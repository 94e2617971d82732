"""The fused head loss's per-chunk work on CPU in C++ (native_xent.cpp, built by kernels/native.py):
soft-cap, log-sum-exp, loss and the logits' gradient in three passes over each row of a chunk.
`rows_loss` returns None where the loop does not apply (not a plain CPU float32 chunk, int64 labels,
inside torch.compile, several torch threads without torch's OpenMP runtime in the library, or no
library; kernels/native.py `elementwise_parts`) and models/common/fused_loss.py runs its PyTorch ops.
`ENABLED = False` (tests) or UNDERTOW_NATIVE=0 keeps to PyTorch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from undertow.kernels import native

NAME = "xent"
SOURCE = Path(__file__).with_name("native_xent.cpp")
ENABLED = True
MIN_ROWS = 16  # rows per thread at least


def _library():
    library = native.load(NAME, SOURCE, openmp=True)
    if library is not None and library.xent_rows.argtypes is None:
        library.xent_rows.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_float, ctypes.c_int64,
                                                               ctypes.c_int, ctypes.c_int64, ctypes.c_int]
        library.xent_rows.restype = ctypes.c_int64
    return library


def rows_loss(z: torch.Tensor, labels: torch.Tensor, soft_cap: float | None, ignore_index: int,
              grad: bool) -> torch.Tensor | None:
    """z (rows, V) contiguous float32 logits, labels (rows,) int64 -> the summed loss (float32, 0-d),
    with `grad` z overwritten by the loss's gradient with respect to the logits before the cap
    (fused_loss.py's formula); None where the loop does not apply. A label outside [0, V) that is
    not ignore_index raises IndexError, as F.cross_entropy does."""
    if not (ENABLED and z.dim() == 2 and z.is_contiguous() and native.plain_cpu_float32(z)
            and labels.dtype == torch.int64 and labels.device.type == "cpu" and _library() is not None):
        return None
    parts = native.elementwise_parts(NAME, z.shape[0], MIN_ROWS)
    if parts is None:
        return None
    labels = labels.contiguous()
    rows, vocab = z.shape
    loss = torch.empty(rows, dtype=torch.float64)
    buffer = torch.empty(parts, vocab, dtype=torch.float32)
    row = _library().xent_rows(z.data_ptr(), labels.data_ptr(), loss.data_ptr(), buffer.data_ptr(), vocab,
                               float(soft_cap or 0.0), ignore_index, int(grad), rows, parts)
    if row:
        raise IndexError(f"label {labels[row - 1].item()} is out of range for a vocabulary of {vocab} "
                         f"(labels must be in [0, {vocab}) or {ignore_index})")
    return loss.sum().float()
