"""ParaRNN: the reference cells against the equations written out by hand, the chunked scan against
a plain loop, and the Newton solver (forward and implicit-function backward) against autograd
through the reference loop, where 3 iterations converge and where they do not."""

import math
import warnings

import pytest
import torch

from tests.kernels.conftest import relative_error
from undertow.kernels.pararnn import NewtonNotConvergedWarning, pararnn
from undertow.kernels.pararnn.reference import pararnn_reference
from undertow.kernels.pararnn.scan import linear_recurrence, reverse_linear_recurrence

WEAK = 0.1     # recurrent weights' scale at which 3 Newton steps leave a residual <= ~1e-9 (float64)
STRONG = 2.0   # ... and at which 3 steps are far from the solution at T = 64


def make_inputs(cell, B, T, D, *, seed, scale=WEAK, with_init=True, dtype=torch.float64):
    """Fresh random projections u (B, T, 3, D), recurrent weights a (3, D) (and peepholes p (2, D) for
    the LSTM) of the given scale, and an initial state of the cell's form."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, 3, D, generator=gen, dtype=torch.float64)
    a = torch.randn(3, D, generator=gen, dtype=torch.float64) * scale
    p = torch.randn(2, D, generator=gen, dtype=torch.float64) * scale if cell == "lstm" else None
    init = None
    if with_init:
        rows = [torch.randn(B, D, generator=gen, dtype=torch.float64) * 0.5 for _ in range(1 if cell == "gru" else 2)]
        init = rows[0].to(dtype) if cell == "gru" else tuple(s.to(dtype) for s in rows)
    return u.to(dtype), a.to(dtype), None if p is None else p.to(dtype), init


def doc_ids_with_boundaries(B, T, starts):
    """(B, T) ids whose documents start at `starts` in row 0 and at starts shifted by 3 in row 1."""
    new_doc = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in starts:
            if 0 < t + 3 * b < T:
                new_doc[b, t + 3 * b] = True
    return new_doc.cumsum(1)


def flat_state(state):
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


def run(fn, cell, u, a, p, init, doc_ids, cot=None):
    """Outputs, final state and the gradients of u, a, p and every initial-state tensor for fixed
    random cotangents of h and of every final-state tensor."""
    leaves = {"u": u, "a": a}
    if p is not None:
        leaves["p"] = p
    for name, s in zip(("init c", "init h") if cell == "lstm" else ("init h",), flat_state(init) if init is not None else ()):
        leaves[name] = s
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    init_leaves = None
    if init is not None:
        init_leaves = leaves["init h"] if cell == "gru" else (leaves["init c"], leaves["init h"])
    y, final = fn(cell, leaves["u"], leaves["a"], leaves.get("p"), initial_state=init_leaves, doc_ids=doc_ids,
                  return_final_state=True)
    final = flat_state(final)
    if cot is None:
        gen = torch.Generator().manual_seed(1)
        cot = [torch.randn(y.shape, generator=gen, dtype=torch.float64)] + \
              [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in final]
    loss = (y.double() * cot[0]).sum() + sum((s.double() * w).sum() for s, w in zip(final, cot[1:]))
    loss.backward()
    return y, final, {k: v.grad for k, v in leaves.items()}, cot


def errors_against_reference(cell, u, a, p, init, doc_ids, **newton):
    """Relative errors of the Newton solver's outputs, final state and gradients against autograd
    through the reference loop run on the same inputs."""
    y_ref, f_ref, g_ref, cot = run(pararnn_reference, cell, u, a, p, init, doc_ids)
    newton_fn = lambda *args, **kw: pararnn(*args, **kw, backend="chunked", **newton)  # noqa: E731
    y, f, g, _ = run(newton_fn, cell, u, a, p, init, doc_ids, cot)
    assert y.dtype == u.dtype and all(s.dtype == r.dtype for s, r in zip(f, f_ref))
    errors = {"y": relative_error(y, y_ref)}
    errors.update({f"final {i}": relative_error(s, r) for i, (s, r) in enumerate(zip(f, f_ref))})
    errors.update({f"grad {k}": relative_error(g[k], g_ref[k]) for k in g_ref})
    return errors


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_cells_match_the_equations_written_per_step():
    """Eqs. G1-G4 and L1-L5 evaluated channel by channel with Python floats, two documents per row."""
    B, T, D = 1, 5, 3
    doc_ids = torch.tensor([[0, 0, 0, 1, 1]])
    for cell in ("gru", "lstm"):
        u, a, p, init = make_inputs(cell, B, T, D, seed=3, scale=1.0)
        y, final = pararnn_reference(cell, u, a, p, initial_state=init, doc_ids=doc_ids, return_final_state=True)
        for d in range(D):
            h = float(flat_state(init)[-1][0, d])
            c = float(init[0][0, d]) if cell == "lstm" else 0.0
            for t in range(T):
                if t == 3:  # a document starts: zero state before it
                    c = h = 0.0
                x = [float(v) for v in u[0, t, :, d]]
                w = [float(v) for v in a[:, d]]
                if cell == "gru":
                    z = sigmoid(w[0] * h + x[0])
                    r = sigmoid(w[1] * h + x[1])
                    h_tilde = math.tanh(w[2] * (r * h) + x[2])
                    h = z * h_tilde + (1 - z) * h
                else:
                    pf, po = float(p[0, d]), float(p[1, d])
                    f = sigmoid(w[0] * h + x[0] + pf * c)
                    c_tilde = math.tanh(w[1] * h + x[1])
                    c = f * c + (1 - f) * c_tilde
                    o = sigmoid(w[2] * h + x[2] + po * c)
                    h = o * math.tanh(c)
                assert abs(float(y[0, t, d]) - h) < 1e-12, (cell, t, d)
            assert abs(float(flat_state(final)[-1][0, d]) - h) < 1e-12
            if cell == "lstm":
                assert abs(float(final[0][0, d]) - c) < 1e-12


@pytest.mark.parametrize("S", [1, 2])
def test_chunked_scan_matches_the_loop(S):
    """x_t = J_t x_{t-1} + r_t and its adjoint, T = 37 with chunks of 8 (not a multiple)."""
    B, T, D = 2, 37, 5
    gen = torch.Generator().manual_seed(S)
    J = torch.randn(B, T, S, S, D, generator=gen, dtype=torch.float64) * 0.6
    r = torch.randn(B, T, S, D, generator=gen, dtype=torch.float64)
    apply = lambda M, v: (M * v.unsqueeze(-3)).sum(-2)  # noqa: E731
    x, forward = torch.zeros(B, S, D, dtype=torch.float64), []
    for t in range(T):
        x = apply(J[:, t], x) + r[:, t]
        forward.append(x)
    lam, backward = torch.zeros(B, S, D, dtype=torch.float64), [None] * T
    for t in reversed(range(T)):
        lam = (apply(J[:, t + 1].transpose(-3, -2), lam) if t < T - 1 else lam) + r[:, t]
        backward[t] = lam
    assert relative_error(linear_recurrence(J, r, 8), torch.stack(forward, 1)) < 1e-14
    assert relative_error(reverse_linear_recurrence(J, r, 8), torch.stack(backward, 1)) < 1e-14


@pytest.mark.parametrize("S", [1, 2])
def test_scans_with_transitions_resume_from_any_carry(S):
    """What a context-parallel slice uses: the solution from a carry = the zero-carry solution plus the
    cumulative transitions applied to the carry, forward and reverse (scan.py)."""
    from undertow.kernels.pararnn.scan import (
        linear_recurrence_with_transitions, matvec, reverse_linear_recurrence_with_transitions,
    )

    B, T, D = 2, 21, 3
    gen = torch.Generator().manual_seed(10 + S)
    J = torch.randn(B, T, S, S, D, generator=gen, dtype=torch.float64) * 0.7
    r = torch.randn(B, T, S, D, generator=gen, dtype=torch.float64)
    carry = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    x, P = linear_recurrence_with_transitions(J, r, 4)
    shifted = r.clone()
    shifted[:, 0] += matvec(J[:, 0], carry)  # x_0 = J_0 carry + r_0
    assert relative_error(x + matvec(P, carry[:, None]), linear_recurrence(J, shifted, 4)) < 1e-13
    lam, Q = reverse_linear_recurrence_with_transitions(J, r, 4)
    shifted = r.clone()
    shifted[:, -1] += carry  # lam_{T-1} = g_{T-1} + the carry from after the slice
    assert relative_error(lam + matvec(Q, carry[:, None]), reverse_linear_recurrence(J, shifted, 4)) < 1e-13


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
@pytest.mark.parametrize("T, chunk, docs, init", [
    (100, 16, [], True),            # T not a multiple of the chunk, carried state
    (61, 16, [5, 16, 40], True),    # documents inside a chunk, at a chunk's start, across chunks
    (23, 64, [9], False),           # one chunk shorter than chunk_size, zero initial state
])
def test_newton_matches_the_reference_where_three_iterations_converge(cell, dtype, tol, T, chunk, docs, init):
    B, D = 2, 8
    u, a, p, state0 = make_inputs(cell, B, T, D, seed=T, with_init=init, dtype=dtype)
    doc_ids = doc_ids_with_boundaries(B, T, docs) if docs else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewtonNotConvergedWarning)  # converged: no warning
        errors = errors_against_reference(cell, u, a, p, state0, doc_ids, iterations=3, chunk_size=chunk)
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_newton_that_has_not_converged_says_so_and_more_iterations_converge(cell):
    """Strong recurrences at T = 64: 3 steps leave a large residual, returned and warned about; with
    T iterations (always exact: step k fixes token k) or a tolerance the solve converges."""
    B, T, D = 2, 64, 8
    u, a, p, state0 = make_inputs(cell, B, T, D, seed=7, scale=STRONG)
    y_ref = pararnn_reference(cell, u, a, p, initial_state=state0)
    with pytest.warns(NewtonNotConvergedWarning, match="residual"):
        y, residual = pararnn(cell, u, a, p, initial_state=state0, iterations=3, return_residual=True)
    assert residual > 1e-2 and relative_error(y, y_ref) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewtonNotConvergedWarning)
        y, residual = pararnn(cell, u, a, p, initial_state=state0, iterations=T, return_residual=True)
        assert residual < 1e-12 and relative_error(y, y_ref) < 1e-10
        y, residual = pararnn(cell, u, a, p, initial_state=state0, iterations=T, tol=1e-9, return_residual=True)
        assert residual <= 1e-9 and relative_error(y, y_ref) < 1e-7
    with pytest.warns(NewtonNotConvergedWarning):  # a tolerance the iterations cannot reach
        pararnn(cell, u, a, p, initial_state=state0, iterations=4, tol=1e-6)


def test_gradients_are_the_reference_loops_once_converged():
    """The implicit-function backward at a strong recurrence, once enough iterations converged."""
    errors = errors_against_reference("lstm", *make_inputs("lstm", 2, 40, 8, seed=11, scale=STRONG), None,
                                      iterations=40)
    bad = {k: e for k, e in errors.items() if not e <= 1e-8}
    assert not bad, f"relative errors above 1e-8: {bad}"


def test_reference_backend_and_bad_arguments():
    u, a, p, state0 = make_inputs("gru", 2, 9, 4, seed=2)
    y, final, residual = pararnn("gru", u, a, initial_state=state0, return_final_state=True, return_residual=True,
                                 backend="reference")
    y_ref, final_ref = pararnn_reference("gru", u, a, initial_state=state0, return_final_state=True)
    assert torch.equal(y, y_ref) and torch.equal(final, final_ref) and residual == 0
    bad = [({"iterations": 0}, "iterations must be an integer >= 1, got 0"), ({"iterations": 2.5}, "iterations"),
           ({"iterations": True}, "iterations"), ({"tol": 0.0}, "tol must be > 0"), ({"tol": -1e-3}, "tol"),
           ({"tol": float("nan")}, "tol"), ({"chunk_size": 0}, "chunk_size must be an integer >= 1")]
    for backend in ("chunked", "reference"):  # refused also where the setting is unused
        for kwargs, message in bad:
            with pytest.raises(ValueError, match=message):
                pararnn("gru", u, a, backend=backend, **kwargs)
    with pytest.raises(ValueError, match="peepholes"):
        pararnn("gru", u, a, torch.ones(2, 4, dtype=u.dtype))
    with pytest.raises(ValueError, match="p \\(2, 4\\)"):
        pararnn("lstm", u, a)
    with pytest.raises(ValueError, match="unknown"):
        pararnn("rnn", u, a)


def test_meta_tensors_run_without_reading_the_residual():
    """The planner profiles models on the meta device: shapes only, no residual to check or warn about."""
    with torch.device("meta"):
        u, a, p = torch.randn(2, 9, 3, 4), torch.randn(3, 4), torch.randn(2, 4)
    y, (c, h), residual = pararnn("lstm", u, a, p, return_final_state=True, return_residual=True)
    assert y.shape == (2, 9, 4) and c.shape == h.shape == (2, 4) and residual.device.type == "meta"
