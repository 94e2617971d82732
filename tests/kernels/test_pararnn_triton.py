"""ParaRNN's Triton scans (kernels/pararnn/triton.py) against the chunked PyTorch scans, and the
"triton" backend (Newton with those scans) against autograd through the reference loop: outputs,
final states and every gradient (u, a, p, the initial state), float32, with documents inside and
across the kernels' chunks and lengths / channels that are not multiples of the tiles. On CPU the
kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before import) at
small shapes and small tiles."""

import warnings

import pytest
import torch

from tests.kernels.conftest import relative_error
from tests.kernels.test_causal_conv1d import DEVICE, triton_runnable
from tests.kernels.test_pararnn import doc_ids_with_boundaries, make_inputs, run
from undertow.kernels.pararnn import IMPLEMENTATIONS
from undertow.kernels.pararnn.reference import pararnn_reference
from undertow.kernels.pararnn.scan import linear_recurrence, reverse_linear_recurrence

TRITON = triton_runnable(IMPLEMENTATIONS, "undertow.kernels.pararnn.triton")
pytestmark = pytest.mark.skipif(not TRITON,
                                reason="the Triton form runs on CUDA or in the interpreter (TRITON_INTERPRET=1)")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 tokens and 4 channels: several chunks and channel blocks at test shapes."""
    from undertow.kernels.pararnn import triton as pararnn_triton

    if DEVICE == "cpu":
        monkeypatch.setattr(pararnn_triton, "CHUNK", 8)
        monkeypatch.setattr(pararnn_triton, "BLOCK_D", 4)
    return pararnn_triton


@pytest.mark.parametrize("S", [1, 2])
def test_triton_scans_match_the_chunked_scans(small_tiles, S):
    B, T, D = 2, 37, 6
    gen = torch.Generator().manual_seed(S)
    J = torch.randn(B, T, S, S, D, generator=gen) * 0.6
    r = torch.randn(B, T, S, D, generator=gen)
    for reverse, exact in ((False, linear_recurrence), (True, reverse_linear_recurrence)):
        x = small_tiles.linear_recurrence_triton(J.to(DEVICE), r.to(DEVICE), reverse=reverse).cpu()
        assert relative_error(x, exact(J.double(), r.double(), 8)) <= 1e-5, reverse


def test_triton_scans_give_the_context_parallel_transitions(small_tiles):
    """The CP form (kernels/pararnn/context.py) runs its slices' scans-with-transitions through the
    Triton kernels on CUDA: the same x~, P (forward) and lam~, Q (reverse) as the PyTorch scans."""
    from undertow.kernels.pararnn.scan import (
        linear_recurrence_with_transitions, reverse_linear_recurrence_with_transitions,
    )

    B, T, D = 1, 19, 5
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(B, T, 2, 2, D, generator=gen) * 0.6
    r = torch.randn(B, T, 2, D, generator=gen)
    fwd = small_tiles.linear_recurrence_triton
    rev = lambda J, g: small_tiles.linear_recurrence_triton(J, g, reverse=True)  # noqa: E731
    for with_transitions, solve in ((linear_recurrence_with_transitions, fwd),
                                    (reverse_linear_recurrence_with_transitions, rev)):
        ours = with_transitions(J.to(DEVICE), r.to(DEVICE), 8, solve)
        exact = with_transitions(J.double(), r.double(), 8)
        assert all(relative_error(x.cpu(), e) <= 1e-5 for x, e in zip(ours, exact))


def on_device(cell, u, a, p, *, initial_state=None, doc_ids=None, **kwargs):
    """The triton backend on DEVICE for CPU tensors, results back on the CPU (differentiable moves)."""
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    init = None if initial_state is None else (move(initial_state) if cell == "gru" else tuple(map(move, initial_state)))
    y, final = IMPLEMENTATIONS["triton"](cell, move(u), move(a), move(p), initial_state=init, doc_ids=move(doc_ids),
                                         iterations=3, **kwargs)
    return y.cpu(), (final.cpu() if cell == "gru" else tuple(s.cpu() for s in final))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_triton_backend_matches_the_reference(small_tiles, cell):
    B, T, D = 2, 29, 6
    u, a, p, init = make_inputs(cell, B, T, D, seed=5, dtype=torch.float32)
    doc_ids = doc_ids_with_boundaries(B, T, [4, 16])  # 16: a chunk start at 8-token chunks
    y_ref, f_ref, g_ref, cot = run(pararnn_reference, cell, u, a, p, init, doc_ids)
    y, f, g, _ = run(on_device, cell, u, a, p, init, doc_ids, cot)
    errors = {"y": relative_error(y, y_ref), **{f"final {i}": relative_error(x, r) for i, (x, r) in enumerate(zip(f, f_ref))},
              **{f"grad {k}": relative_error(g[k], g_ref[k]) for k in g_ref}}
    bad = {k: e for k, e in errors.items() if not e <= 1e-4}
    assert not bad, f"relative errors above 1e-4: {bad}"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_triton_backend_takes_the_chunked_iterates_converged_or_not(small_tiles, cell):
    """The fused passes solve the same linear systems as the chunked PyTorch form: the same outputs
    and residual where 3 steps are far from the solution (both warn), and the same early stop with
    a tolerance."""
    from undertow.kernels.pararnn import NewtonNotConvergedWarning, native, pararnn

    B, T, D = 1, 13, 5
    u, a, p, init = make_inputs(cell, B, T, D, seed=8, scale=2.0, dtype=torch.float32)
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    init_d = move(init) if cell == "gru" else tuple(map(move, init))
    native.ENABLED = False  # the PyTorch chunked form, the one the fused kernels mirror
    try:
        for newton in (dict(iterations=3), dict(iterations=T, tol=1e-5)):
            out = {}
            for backend in ("triton", "chunked"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NewtonNotConvergedWarning)
                    out[backend] = pararnn(cell, move(u), move(a), move(p), initial_state=init_d, return_residual=True,
                                           backend=backend, **newton)
            (y, res), (y_ref, res_ref) = out["triton"], out["chunked"]
            assert relative_error(y.cpu(), y_ref.cpu()) <= 1e-4, newton
            assert abs(res.item() - res_ref.item()) <= 1e-4 * max(res_ref.item(), 1.0), (newton, res, res_ref)
            assert (res_ref.item() > 1e-3) if "tol" not in newton else (res_ref.item() <= 1e-5)
    finally:
        native.ENABLED = True


def test_triton_backend_takes_float16_inputs(small_tiles):
    """Half-precision projections are solved in float32 and come back in float16 (1e-2, DESIGN.md's
    low-precision tolerance), gradients included."""
    B, T, D = 1, 11, 5
    u, a, _, init = make_inputs("gru", B, T, D, seed=12, dtype=torch.float32)
    y_ref, f_ref, g_ref, cot = run(pararnn_reference, "gru", u, a, None, init, None)
    y, f, g, _ = run(on_device, "gru", u.half(), a.half(), None, init.half(), None, cot)
    assert y.dtype == torch.float16 and relative_error(y, y_ref) <= 1e-2
    assert all(relative_error(g[k], g_ref[k]) <= 1e-2 for k in g_ref), {k: relative_error(g[k], g_ref[k]) for k in g_ref}


def test_triton_backend_refuses_float64():
    u, a, _, _ = make_inputs("gru", 1, 4, 2, seed=1)
    with pytest.raises(ValueError, match="float32"):
        IMPLEMENTATIONS["triton"]("gru", u.to(DEVICE), a.to(DEVICE))
