"""ParaRNN's fused native Newton solver (kernels/pararnn/native_pararnn.cpp) against the PyTorch
chunked form and the reference loop in float32: outputs, final states, residual and every gradient
(u, a, p, the initial state), with documents and a carried state, channels not a multiple of the
native block, converged, not converged (the same iterates as PyTorch) and with a tolerance."""

import warnings

import pytest
import torch

from tests.kernels.conftest import relative_error
from tests.kernels.test_pararnn import doc_ids_with_boundaries, make_inputs, run
from undertow.kernels import native
from undertow.kernels.pararnn import NewtonNotConvergedWarning, pararnn
from undertow.kernels.pararnn import native as pararnn_native
from undertow.kernels.pararnn.reference import pararnn_reference


@pytest.fixture
def native_loop(monkeypatch):
    """Fails rather than skips where a compiler exists but the library does not build."""
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler: the native loop cannot be built here")
    assert pararnn_native._library() is not None, native.unavailable_reason(pararnn_native.NAME)
    monkeypatch.setattr(pararnn_native, "ENABLED", True)


def solve(enabled: bool, **newton):
    """The chunked backend's function with the native loop on or off."""
    def fn(*args, **kwargs):
        previous, pararnn_native.ENABLED = pararnn_native.ENABLED, enabled
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NewtonNotConvergedWarning)
                return pararnn(*args, **kwargs, backend="chunked", **newton)
        finally:
            pararnn_native.ENABLED = previous
    return fn


def results(fn, cell, u, a, p, init, doc_ids, cot=None):
    y, final, grads, cot = run(fn, cell, u, a, p, init, doc_ids, cot)
    return [y, *final, *grads.values()], cot


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("tol", [None, 1e-6])
def test_native_equals_pytorch_and_the_reference_where_newton_converges(native_loop, cell, tol):
    B, T, D = 2, 53, 70  # D: one full block of 64 channels and a partial one
    u, a, p, init = make_inputs(cell, B, T, D, seed=4, dtype=torch.float32)
    doc_ids = doc_ids_with_boundaries(B, T, [6, 30])
    ref, cot = results(pararnn_reference, cell, u, a, p, init, doc_ids)
    fast, _ = results(solve(True, iterations=3, tol=tol), cell, u, a, p, init, doc_ids, cot)
    slow, _ = results(solve(False, iterations=3, tol=tol, chunk_size=16), cell, u, a, p, init, doc_ids, cot)
    for name, x in (("native", fast), ("pytorch", slow)):
        bad = [i for i, (v, r) in enumerate(zip(x, ref)) if not relative_error(v, r) <= 1e-5]
        assert not bad, (name, [relative_error(x[i], ref[i]) for i in bad])
    assert max(relative_error(f, s) for f, s in zip(fast, slow)) <= 1e-5


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_native_takes_the_same_iterates_where_newton_has_not_converged(native_loop, cell):
    """Strong recurrences, 3 steps: far from the solution, but the native pass and PyTorch's chunked
    scans solve the same linear systems, so outputs and residual agree (and both warn)."""
    B, T, D = 2, 40, 20
    u, a, p, init = make_inputs(cell, B, T, D, seed=9, scale=2.0, dtype=torch.float32)
    out = {}
    for enabled in (True, False):
        pararnn_native.ENABLED = enabled
        with pytest.warns(NewtonNotConvergedWarning):
            out[enabled] = pararnn(cell, u, a, p, initial_state=init, iterations=3, return_residual=True)
    pararnn_native.ENABLED = True
    (y_fast, r_fast), (y_slow, r_slow) = out[True], out[False]
    assert r_slow > 1e-2 and abs(r_fast - r_slow) <= 1e-4 * r_slow
    assert relative_error(y_fast, y_slow) <= 1e-4


def test_native_residual_says_nan(native_loop):
    u, a, _, init = make_inputs("gru", 1, 12, 8, seed=1, dtype=torch.float32)
    u[0, 5, 0, 3] = float("nan")
    with pytest.warns(NewtonNotConvergedWarning, match="nan"):
        _, residual = pararnn("gru", u, a, initial_state=init, return_residual=True)
    assert torch.isnan(residual)


def test_undertow_native_0_runs_the_pytorch_form(native_loop, monkeypatch):
    u, a, p, init = make_inputs("lstm", 1, 7, 4, seed=6, dtype=torch.float32)
    keep = torch.ones(1, 7, 1, 1)
    state = torch.stack(init, 1)
    assert pararnn_native.native_solve("lstm", u, a, p, state, keep, 3, None) is not None
    monkeypatch.setenv(native.ENV, "0")
    native.forget(pararnn_native.NAME)
    try:
        assert pararnn_native.native_solve("lstm", u, a, p, state, keep, 3, None) is None
        y = pararnn("lstm", u, a, p, initial_state=init)  # the PyTorch form, still the reference's result
        assert relative_error(y, pararnn_reference("lstm", u, a, p, initial_state=init)) <= 1e-5
    finally:
        monkeypatch.delenv(native.ENV)
        native.forget(pararnn_native.NAME)  # the next use loads the cached library again


def test_native_is_skipped_where_it_does_not_apply(native_loop):
    """float64 and UNDERTOW_NATIVE=0 (ENABLED off) run the PyTorch form: native_solve says so."""
    u, a, _, init = make_inputs("gru", 1, 5, 4, seed=2)
    keep = torch.ones(1, 5, 1, 1, dtype=u.dtype)
    assert pararnn_native.native_solve("gru", u, a, None, init[:, None], keep, 3, None) is None  # float64
    pararnn_native.ENABLED = False
    assert pararnn_native.native_solve("gru", u.float(), a.float(), None, init[:, None].float(), keep.float(), 3,
                                       None) is None
    pararnn_native.ENABLED = True
