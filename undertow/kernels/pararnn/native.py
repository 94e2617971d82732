"""ParaRNN's Newton solver on CPU in C++ (built by kernels/native.py): all Newton steps fused into
one pass over the tokens (native_pararnn.cpp), and the implicit-function backward as one reverse
pass (native_pararnn_bwd.cpp); their headers say why that is the same math as newton.py's chunked
form.

`native_solve` and `native_backward` return None where the loops do not apply (not CPU, not
float32, empty input, or no library), and the caller runs the PyTorch form. Set `ENABLED = False`
(tests) or UNDERTOW_NATIVE=0 to keep to PyTorch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from undertow.kernels import native

NAME, BACKWARD_NAME = "pararnn", "pararnn_bwd"
SOURCE = Path(__file__).with_name("native_pararnn.cpp")
BACKWARD_SOURCE = Path(__file__).with_name("native_pararnn_bwd.cpp")
ENABLED = True
BLOCK = 64  # channels per unit of work (the forward's BLOCK: 4 vectors of 16); rows x blocks feed the threads

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FWD_ARGS = [ctypes.c_int] + [_P] * 7 + [_I] * 8
_CP_ARGS = [ctypes.c_int] + [_P] * 9 + [_I] * 6
_BWD_ARGS = [ctypes.c_int] + [_P] * 11 + [_I] * 6


def _library():
    """The forward's library (pararnn_fwd, pararnn_cp_step), or None."""
    library = native.load(NAME, SOURCE)
    if library is not None and library.pararnn_fwd.argtypes is None:
        for fn, args in ((library.pararnn_fwd, _FWD_ARGS), (library.pararnn_cp_step, _CP_ARGS)):
            fn.argtypes, fn.restype = args, ctypes.c_int
    return library


def _backward_library():
    """The backward's library (pararnn_bwd), or None."""
    library = native.load(BACKWARD_NAME, BACKWARD_SOURCE)
    if library is not None and library.pararnn_bwd.argtypes is None:
        library.pararnn_bwd.argtypes, library.pararnn_bwd.restype = _BWD_ARGS, ctypes.c_int
    return library


def applies(u: torch.Tensor) -> bool:
    return ENABLED and u.device.type == "cpu" and u.dtype == torch.float32 and u.numel() > 0


def _operands(cell, u, a, p, init, keep):
    """What the loops read through raw pointers: contiguous float32, keep (B, T) uint8, p always
    given (the GRU's is never read)."""
    p = a[:2] if p is None else p
    return (u.contiguous(), a.contiguous(), p.contiguous(), init.contiguous(),
            keep.reshape(keep.shape[0], keep.shape[1]).to(torch.uint8).contiguous())


def _run(library, fn, args, units: int) -> None:
    def call(begin: int, end: int, index: int) -> None:
        if fn(*args, begin, end):
            raise RuntimeError("ParaRNN native loop failed")

    native.run_parts(call, native.parts(units))


@torch.compiler.disable  # raw pointers: torch.compile must run this eagerly, never trace it
def native_solve(cell: str, u, a, p, init, keep, iterations: int, tol: float | None):
    """newton.py's `newton_solve` (eqs. N0-N2) in one fused pass: u (B, T, 3, D), a (3, D), p (2, D)
    or None, init (B, S, D), keep (B, T, 1, 1) (0 where a document starts), float32 on CPU ->
    (states (B, T, S, D), residual 0-d) or None. With `tol` the steps run one pass each, stopping
    once max |F| <= tol, as newton_solve does."""
    library = _library() if applies(u) else None
    if library is None:
        return None
    B, T, _, D = u.shape
    S = init.shape[1]
    u, a, p, init, keep = _operands(cell, u, a, p, init, keep)
    states = u.new_empty(B, T, S, D)
    units = B * -(-D // BLOCK)
    lstm = int(cell == "lstm")

    def passes(steps: int, from_guess: bool) -> torch.Tensor:
        res = u.new_empty(units, steps + 1)
        args = [lstm, u.data_ptr(), a.data_ptr(), p.data_ptr(), init.data_ptr(), keep.data_ptr(), states.data_ptr(),
                res.data_ptr(), steps, int(from_guess), B, T, D, BLOCK]
        _run(library, library.pararnn_fwd, args, units)
        return res.amax(0)  # NaN propagates

    if tol is None:
        return states, passes(iterations, True)[-1]
    residual = passes(0, True)[0]
    for _ in range(iterations):
        if residual <= tol:
            break
        residual = passes(1, False)[1]
    return states, residual


@torch.compiler.disable
def native_residual(cell: str, u, a, p, init, keep, states):
    """max |F_t| (0-d) at `states` (B, T, S, D), float32 on CPU, or None: the native pass from the given
    iterate with no Newton step (context.py's C3). Operands as `native_solve`."""
    library = _library() if applies(u) else None
    if library is None:
        return None
    B, T, _, D = u.shape
    u, a, p, init, keep = _operands(cell, u, a, p, init, keep)
    work = states.contiguous().clone()  # the pass writes the iterate back
    units = B * -(-D // BLOCK)
    res = u.new_empty(units, 1)
    args = [int(cell == "lstm"), u.data_ptr(), a.data_ptr(), p.data_ptr(), init.data_ptr(), keep.data_ptr(),
            work.data_ptr(), res.data_ptr(), 0, 0, B, T, D, BLOCK]
    _run(library, library.pararnn_fwd, args, units)
    return res.amax()


@torch.compiler.disable
def native_cp_step(cell: str, u, a, p, init, keep, states):
    """One Newton step on a context-parallel slice (context.py, C1), float32 on CPU, or None: from the
    iterate `states` (B, L, S, D), init (B, S, D) the state before token 0 and keep (B, L, 1, 1) with
    token 0's entry (0 where a document starts there) -> (states + x~ (B, L, S, D), the cumulative
    transitions P (B, L, S, S, D), x~ at the last token (B, S, D), max |r| (0-d)); x~ is the slice's
    update from a zero carry, x~_t = J_t x~_{t-1} + r_t."""
    library = _library() if applies(u) else None
    if library is None:
        return None
    B, L, _, D = u.shape
    S = states.shape[2]
    u, a, p, init, keep = _operands(cell, u, a, p, init, keep)
    out = states.contiguous().clone()
    trans, xlast = u.new_empty(B, L, S, S, D), u.new_empty(B, S, D)
    units = B * -(-D // BLOCK)
    res = u.new_empty(units)
    args = [int(cell == "lstm"), *(t.data_ptr() for t in (u, a, p, init, keep, out, trans, xlast, res)), B, L, D, BLOCK]
    _run(library, library.pararnn_cp_step, args, units)
    return out, trans, xlast, res.amax()


@torch.compiler.disable
def native_backward(cell: str, u, a, p, init, keep, states, g):
    """newton.py's backward (eqs. B1-B2) in one reverse pass at the solution `states` (B, T, S, D)
    for the states' gradient g (B, T, S, D) -> (du (B, T, 3, D), da (3, D), dp (2, D) or None,
    dinit (B, S, D)) or None; operands as `native_solve`."""
    library = _backward_library() if applies(u) else None
    if library is None:
        return None
    B, T, _, D = u.shape
    u, a, p_given, init, keep = _operands(cell, u, a, p, init, keep)
    states, g = states.contiguous(), g.to(torch.float32).contiguous()
    du, dinit = torch.empty_like(u), torch.empty_like(init)
    da, dp = u.new_zeros(B, 3, D), u.new_zeros(B, 2, D)
    units = B * -(-D // BLOCK)
    args = [int(cell == "lstm"), *(t.data_ptr() for t in (u, a, p_given, init, keep, states, g, du, da, dp, dinit)),
            B, T, D, BLOCK]
    _run(library, library.pararnn_bwd, args, units)
    return du, da.sum(0), None if p is None else dp.sum(0), dinit
