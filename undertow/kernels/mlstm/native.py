"""The mLSTM on CPU as its recurrence in C++ (native_mlstm.cpp, built by kernels/native.py), forward
and exact backward: the chunked backend's CPU path for float32 (and bf16/fp16 inputs, computed in
float32), one (row, head) per unit of work, units split over torch's threads (in an OpenMP region
of torch's own runtime where kernels/native.py could build it so). `native_mlstm`
returns None where it does not apply (not CPU, float64, tensor subclasses, empty input, a head
state above MAX_STATE entries when gradients are wanted, or no library) and the caller runs the
PyTorch chunkwise form. Eagerly the loops run through an autograd.Function; under torch.compile
through custom operators (`torch.ops.undertow.mlstm_recurrence` and its backward), so compiled
blocks call them too. `ENABLED = False`
(tests) or UNDERTOW_NATIVE=0 keeps to PyTorch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from undertow.kernels import native
from undertow.kernels.dispatch import segment_starts

NAME = "mlstm"
SOURCE = Path(__file__).with_name("native_mlstm.cpp")
ENABLED = True
SPAN = 16  # tokens between the forward's saved states (the backward replays each span)
# The recurrence's work per token grows with the state (Dqk x Dv), the chunkwise form's mostly with
# the chunk (L (Dqk + Dv)). Measured (docs/benchmarks.md), 1 thread: the forward alone is 2-5x faster
# than the chunkwise form at every head size tried (16 x 32 up to xLSTM-7B's 256 x 512); forward +
# backward 2.7x faster at 16 x 32 but 15% slower at 64 x 128 (the backward's replay and per-token
# state passes). So with gradients the native form runs up to this many state entries per head,
# without gradients (validation, generation's prefill) at every size.
MAX_STATE = 4096

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FWD = [_P] * 14 + [_I] * 6 + [ctypes.c_float, _I, _I, ctypes.c_int]
_BWD = [_P] * 19 + [_I] * 6 + [ctypes.c_float, _I, _I, ctypes.c_int]


def _library():
    library = native.load(NAME, SOURCE, openmp=True)
    if library is not None and library.mlstm_fwd.argtypes is None:
        library.mlstm_fwd.argtypes, library.mlstm_bwd.argtypes = _FWD, _BWD
        library.mlstm_fwd.restype = library.mlstm_bwd.restype = ctypes.c_int
    return library


def _run(fn, B: int, H: int) -> None:
    """fn(u0, u1, threads) over the B * H units: one call whose OpenMP region splits them over
    torch's threads where the library has OpenMP, else parts on Python threads."""
    if native.uses_openmp(NAME):
        fn(0, B * H, torch.get_num_threads())
    else:
        native.run_parts(lambda u0, u1, _: fn(u0, u1, 1), native.parts(B * H))


def _forward_impl(q, k, v, i, f, C0, n0, m0, reset, eps: float, save: bool):
    """Contiguous float32 inputs -> h (B, T, H, Dv), the final C, n, m, and the span checkpoints the
    backward replays (empty unless `save`)."""
    B, T, H, K = q.shape
    V = v.shape[3]
    h = torch.empty(B, T, H, V)
    CT, nT, mT = torch.empty(B, H, K, V), torch.empty(B, H, K), torch.empty(B, H)
    ckpt = torch.empty(B * H, -(-T // SPAN), K * V + K + 1) if save else torch.empty(0)
    pointers = native.pointers(q, k, v, i, f, reset, C0, n0, m0, h, CT, nT, mT, ckpt if save else None)
    fn = _library().mlstm_fwd
    _run(lambda u0, u1, threads: fn(*pointers, B, T, H, K, V, SPAN, eps, u0, u1, threads), B, H)
    return h, CT, nT, mT, ckpt


def _backward_impl(q, k, v, i, f, reset, ckpt, gh, gCT, gnT, gmT, eps: float, state: bool):
    """The gradients of q, k, v, i, f and (with `state`; else empty) of the initial C, n, m, from
    those of h and of the final state (None: zero)."""
    B, T, H, K = q.shape
    V = v.shape[3]
    c = lambda t: None if t is None else t.contiguous().float()
    gh, gCT, gnT, gmT = c(gh), c(gCT), c(gnT), c(gmT)
    if gh is None:
        gh = torch.zeros(B, T, H, V)
    if gCT is not None or gnT is not None or gmT is not None:  # all three, zeros where absent
        gCT = gCT if gCT is not None else torch.zeros(B, H, K, V)
        gnT = gnT if gnT is not None else torch.zeros(B, H, K)
        gmT = gmT if gmT is not None else torch.zeros(B, H)
    gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    gi, gf = torch.empty_like(i), torch.empty_like(f)
    gC0, gn0, gm0 = (torch.empty(B, H, K, V), torch.empty(B, H, K), torch.empty(B, H)) if state else \
        (torch.empty(0), torch.empty(0), torch.empty(0))  # distinct: a custom op's outputs may not alias
    initial = (gC0, gn0, gm0) if state else (None, None, None)
    pointers = native.pointers(q, k, v, i, f, reset, ckpt, gh, gCT, gnT, gmT, gq, gk, gv, gi, gf, *initial)
    fn = _library().mlstm_bwd
    _run(lambda u0, u1, threads: fn(*pointers, B, T, H, K, V, SPAN, eps, u0, u1, threads), B, H)
    return gq, gk, gv, gi, gf, gC0, gn0, gm0


class _NativeMLSTM(torch.autograd.Function):
    """The eager path (an autograd.Function costs less per call than a custom operator's dispatch:
    ~4 ms a tiny-xlstm step, measured)."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, reset, eps, save):
        h, CT, nT, mT, ckpt = _forward_impl(q, k, v, i, f, C0, n0, m0, reset, eps, save)
        ctx.save_for_backward(q, k, v, i, f, reset, ckpt)
        ctx.eps, ctx.state = eps, C0 is not None
        return h, CT, nT, mT

    @staticmethod
    def backward(ctx, gh, gCT, gnT, gmT):
        q, k, v, i, f, reset, ckpt = ctx.saved_tensors
        gq, gk, gv, gi, gf, gC0, gn0, gm0 = _backward_impl(q, k, v, i, f, reset, ckpt, gh, gCT, gnT, gmT, ctx.eps,
                                                           ctx.state)
        if not ctx.state:
            gC0 = gn0 = gm0 = None
        return gq, gk, gv, gi, gf, gC0, gn0, gm0, None, None, None


# The same loops as two custom operators with an autograd formula, for torch.compile: opaque to its
# tracing, so a compiled block calls them (a ctypes call inside a traced function would break the graph).
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, Tensor? C0, Tensor? n0, Tensor? m0, Tensor? reset, "
               "float eps, bool save) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, Tensor? reset, Tensor ckpt, Tensor? gh, "
               "Tensor? gCT, Tensor? gnT, Tensor? gmT, float eps, bool state) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_recurrence = torch.library.custom_op("undertow::mlstm_recurrence", _forward_impl, mutates_args=(),
                                      schema=_FWD_SCHEMA)
_recurrence_backward = torch.library.custom_op("undertow::mlstm_recurrence_backward", _backward_impl,
                                               mutates_args=(), schema=_BWD_SCHEMA)


@_recurrence.register_fake
def _(q, k, v, i, f, C0, n0, m0, reset, eps, save):
    B, T, H, K = q.shape
    V = v.shape[3]
    ckpt = q.new_empty(B * H, -(-T // SPAN), K * V + K + 1) if save else q.new_empty(0)
    return q.new_empty(B, T, H, V), q.new_empty(B, H, K, V), q.new_empty(B, H, K), q.new_empty(B, H), ckpt


@_recurrence_backward.register_fake
def _(q, k, v, i, f, reset, ckpt, gh, gCT, gnT, gmT, eps, state):
    B, T, H, K = q.shape
    V = v.shape[3]
    states = (q.new_empty(B, H, K, V), q.new_empty(B, H, K), q.new_empty(B, H)) if state else \
        (q.new_empty(0), q.new_empty(0), q.new_empty(0))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(i), torch.empty_like(f),
            *states)


def _setup_context(ctx, inputs, output):
    q, k, v, i, f, C0, n0, m0, reset, eps, save = inputs
    ctx.save_for_backward(q, k, v, i, f, reset, output[4])
    ctx.eps, ctx.state = eps, C0 is not None


def _backward(ctx, gh, gCT, gnT, gmT, _gckpt):
    q, k, v, i, f, reset, ckpt = ctx.saved_tensors
    gq, gk, gv, gi, gf, gC0, gn0, gm0 = torch.ops.undertow.mlstm_recurrence_backward(
        q, k, v, i, f, reset, ckpt, gh, gCT, gnT, gmT, ctx.eps, ctx.state)
    if not ctx.state:
        gC0 = gn0 = gm0 = None
    return gq, gk, gv, gi, gf, gC0, gn0, gm0, None, None, None


_recurrence.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _available() -> bool:
    """Whether the library loads (built on the first call; a constant to torch.compile's tracing)."""
    return _library() is not None


def native_mlstm(q, k, v, i, f, eps, initial_state, doc_ids, return_final_state):
    """`mlstm_chunked`'s result by the native recurrence, or None where it does not apply."""
    tensors = [q, k, v, i, f] + list(initial_state or ())
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not (ENABLED and q.numel() > 0 and v.shape[3] > 0 and (not grad or q.shape[3] * v.shape[3] <= MAX_STATE)
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                    and t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)
            and _available()):
        return None
    B, T = q.shape[:2]
    c = lambda t: t.float().contiguous()
    state = tuple(c(s) for s in initial_state) if initial_state is not None else (None, None, None)
    reset = None
    if doc_ids is not None:
        reset = segment_starts(doc_ids, (B, T), q.device).to(torch.uint8).contiguous()
    args = (c(q), c(k), c(v), c(i), c(f), *state, reset, eps, grad)
    if torch.compiler.is_compiling():
        h, CT, nT, mT, _ = torch.ops.undertow.mlstm_recurrence(*args)
    else:
        h, CT, nT, mT = _NativeMLSTM.apply(*args)
    h = h.to(q.dtype)
    return (h, (CT, nT, mT)) if return_final_state else h
