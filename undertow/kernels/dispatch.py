"""Backend choice shared by every kernel op: never silent, never a quiet fallback.

Each op has backends "reference" (sequential loop, the spec), "chunked" (PyTorch, autograd) and,
where it pays, "triton". The default is triton for CUDA tensors when the op has it and Triton
imports, else chunked. `backend=` or UNDERTOW_KERNEL_BACKEND forces one; a forced backend that
cannot run raises. The choice is logged once per (op, backend).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from undertow.log import get_logger

BACKENDS = ("reference", "chunked", "triton")
ENV = "UNDERTOW_KERNEL_BACKEND"
_logged: set[tuple[str, str]] = set()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if not triton_available():
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def select_backend(op: str, tensor: torch.Tensor, backend: str | None, available: tuple[str, ...]) -> str:
    """Pick the backend of `op` for inputs like `tensor`; `available` lists what the op implements."""
    forced = backend or os.environ.get(ENV) or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"{op}: backend {forced!r} is unknown; choose one of {BACKENDS}")
        if forced not in available:
            raise RuntimeError(f"{op}: backend {forced!r} is not implemented; available: {available}")
        if forced == "triton" and not triton_runs_on(tensor):
            raise RuntimeError(
                f"{op}: backend 'triton' was forced but cannot run on {tensor.device} tensors "
                "(needs CUDA, or TRITON_INTERPRET=1 set before the kernel module is imported, and triton installed)"
            )
        chosen, why = forced, "forced"
    elif "triton" in available and tensor.is_cuda and triton_available():
        chosen, why = "triton", "CUDA tensors"
    else:
        chosen = "chunked" if "chunked" in available else "reference"
        why = "no CUDA tensors" if not tensor.is_cuda else "triton unavailable"
    if (op, chosen) not in _logged:
        _logged.add((op, chosen))
        get_logger("undertow.kernels").info("%s backend: %s (%s)", op, chosen, why)
    return chosen


def segment_starts(doc_ids: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor:
    """(B, T) bool, True where a new segment starts at t > 0 (a state reset). Never True at t = 0:
    the first segment of a row continues from `initial_state`."""
    B, T = shape
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    if doc_ids is not None:
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def continuous_rows(doc_ids: torch.Tensor | None, rows: int, length: int, device) -> torch.Tensor:
    """(rows,) float32: 1 where no document starts after the slice's first token, else 0 (the rows
    through which a carried state reaches the slice's end; context parallelism's transitions)."""
    return (~segment_starts(doc_ids, (rows, length), device).any(1)).float()


def in_last_segment(doc_ids: torch.Tensor | None, rows: int, length: int, device) -> torch.Tensor | None:
    """(rows, length) bool: the token belongs to the slice's last segment (None: no boundaries)."""
    if doc_ids is None:
        return None
    segment = segment_starts(doc_ids, (rows, length), device).cumsum(1)
    return segment == segment[:, -1:]


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on devices that have it (the planner's meta device has none): a chunked form
    that computes in float32 keeps doing so inside a model run under bf16 autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
