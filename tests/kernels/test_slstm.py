"""sLSTM: the CPU form (native loop, forward and hand-written backward) against the reference loop,
and the reference against the xLSTM authors' own sLSTM cell."""

import pytest
import torch

from tests import oracles
from tests.kernels.conftest import relative_error
from tests.kernels.test_causal_conv1d import DEVICE, make_doc_ids, triton_runnable
from undertow.kernels import native
from undertow.kernels.slstm import IMPLEMENTATIONS, slstm
from undertow.kernels.slstm import native as slstm_native
from undertow.kernels.slstm.reference import slstm_cell, slstm_reference

STATE = ("y", "c", "n", "m")


def make_inputs(B, T, H, D, *, seed, gate_scale=1.0, with_init=True, dtype=torch.float32):
    """Fresh random gates (W x + b) and R; `gate_scale` spreads the gate pre-activations, so the
    stabilizer's max switches between its two sides (large input gates vs. strong forget gates)."""
    gen = torch.Generator().manual_seed(seed)
    gates = torch.randn(B, T, 4, H, D, generator=gen) * gate_scale
    gates[:, :, 1] += 2.0  # forget gates mostly open, as trained sLSTMs keep them
    R = torch.randn(4, H, D, D, generator=gen) / D**0.5
    init = None
    if with_init:
        y0 = torch.randn(B, H, D, generator=gen) * 0.5
        n0 = torch.rand(B, H, D, generator=gen) + 0.5
        c0 = torch.randn(B, H, D, generator=gen) * n0
        m0 = torch.randn(B, H, D, generator=gen)
        init = (y0, c0, n0, m0)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(gates), cast(R), None if init is None else tuple(cast(s) for s in init)


def run(fn, gates, R, init, doc_ids, cot=None):
    """y, final state and the gradients of gates, R and every initial-state tensor, for fixed
    random cotangents of y and of the final state."""
    leaves = [gates.detach().clone().requires_grad_(), R.detach().clone().requires_grad_()]
    init_leaves = None if init is None else tuple(s.detach().clone().requires_grad_() for s in init)
    y, final = fn(leaves[0], leaves[1], initial_state=init_leaves, doc_ids=doc_ids, return_final_state=True)
    if cot is None:
        gen = torch.Generator().manual_seed(1)
        cot = [torch.randn(y.shape, generator=gen)] + [torch.randn(s.shape, generator=gen) for s in final[:3]]
    # m's cotangent stays zero: a loss never reads the stabilizer (y, c / n do not depend on it)
    loss = (y.double() * cot[0]).sum() + sum((s.double() * w).sum() for s, w in zip(final[:3], cot[1:]))
    loss.backward()
    grads = {"gates": leaves[0].grad, "R": leaves[1].grad}
    if init_leaves is not None:
        grads.update({f"init {name}": s.grad for name, s in zip(STATE, init_leaves)})
    return y, final, grads, cot


@pytest.fixture(params=["native", "torch"])
def cpu_loop(request, monkeypatch):
    """The CPU form's loop: the native one (which must build where a compiler is) or the PyTorch loop."""
    if request.param == "native":
        if native.find_compiler() is None:
            pytest.skip("no C++ compiler: the native loop cannot be built here")
        assert slstm_native._library() is not None, native.unavailable_reason(slstm_native.NAME)
    monkeypatch.setattr(slstm_native, "ENABLED", request.param == "native")
    return request.param


@pytest.mark.parametrize("T, docs, init, gate_scale", [
    (1, False, True, 1.0), (7, True, False, 1.0), (33, True, True, 3.0), (64, False, True, 6.0), (50, True, True, 0.3)])
def test_cpu_form_matches_the_reference(cpu_loop, T, docs, init, gate_scale):
    B, H, D = 2, 3, 8
    gates, R, state0 = make_inputs(B, T, H, D, seed=T, gate_scale=gate_scale, with_init=init)
    doc_ids = make_doc_ids(B, T, seed=T) if docs else None
    y_ref, f_ref, g_ref, cot = run(lambda *a, **k: slstm_reference(*a, **k), gates.double(), R.double(),
                                   None if state0 is None else tuple(s.double() for s in state0), doc_ids)
    y, f, g, _ = run(lambda *a, **k: slstm(*a, **k, backend="chunked"), gates, R, state0, doc_ids, cot)
    assert y.dtype == torch.float32 and all(s.dtype == torch.float32 for s in f)
    errors = {"y": relative_error(y, y_ref)}
    errors.update({f"final {name}": relative_error(a, b) for name, a, b in zip(STATE, f, f_ref)})
    errors.update({f"grad {k}": relative_error(g[k], g_ref[k]) for k in g_ref})
    bad = {k: e for k, e in errors.items() if not e <= 1e-5}
    assert not bad, f"relative errors above 1e-5: {bad}"


TRITON = triton_runnable(IMPLEMENTATIONS, "undertow.kernels.slstm.triton")


def compare_to_reference(backend, B, T, H, D, *, docs, init, gate_scale, dtype, tol):
    gates, R, state0 = make_inputs(B, T, H, D, seed=T + D, gate_scale=gate_scale, with_init=init)
    doc_ids = make_doc_ids(B, T, seed=T).cpu() if docs else None
    y_ref, f_ref, g_ref, cot = run(slstm_reference, gates.double(), R.double(),
                                   None if state0 is None else tuple(s.double() for s in state0), doc_ids)
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    y, f, g, _ = run(lambda *a, **k: slstm(*a, **k, backend=backend), to(gates), to(R),
                     None if state0 is None else tuple(to(s) for s in state0),
                     None if doc_ids is None else doc_ids.to(DEVICE), [c.to(DEVICE) for c in cot])
    errors = {"y": relative_error(y.cpu(), y_ref)}
    errors.update({f"final {name}": relative_error(a.cpu(), b) for name, a, b in zip(STATE, f, f_ref)})
    errors.update({f"grad {k}": relative_error(g[k].cpu(), g_ref[k]) for k in g_ref})
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


@pytest.mark.skipif(not TRITON, reason="the Triton form runs on CUDA or in the interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("T, D, docs, init, gate_scale", [
    (1, 4, False, True, 1.0), (9, 8, True, False, 3.0), (13, 6, True, True, 0.5), (17, 8, False, True, 6.0)])
def test_triton_matches_the_reference(T, D, docs, init, gate_scale):
    """D = 6 is not a power of two: the kernels mask their padded lanes."""
    compare_to_reference("triton", 2, T, 2, D, docs=docs, init=init, gate_scale=gate_scale, dtype=torch.float32,
                         tol=1e-4)


@pytest.mark.skipif(not TRITON, reason="the Triton form runs on CUDA or in the interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_triton_half_precision_inputs(dtype):
    """bf16 on a GPU only (scripts/gpu_check.sh): the interpreter's bf16 is not trusted."""
    compare_to_reference("triton", 2, 11, 2, 8, docs=True, init=True, gate_scale=1.0, dtype=dtype, tol=1e-2)


@pytest.mark.parametrize("seed, gate_scale", [(64, 6.0), (33, 3.0), (50, 0.3)])
def test_stabilizer_takes_both_sides_of_its_max(seed, gate_scale):
    """The inputs of the comparison above exercise both branches of m = max(i~, m + logsigmoid(f~))."""
    gates, R, state = make_inputs(2, 40, 3, 8, seed=seed, gate_scale=gate_scale)
    input_wins = []
    for t in range(gates.shape[1]):
        raw = gates[:, t] + torch.einsum("bhk,ghkj->bghj", state[0], R)
        state = slstm_cell(raw, state)
        input_wins.append((state[3] == raw[:, 0]).float().mean())
    share = torch.stack(input_wins).mean()
    assert 0.02 < share < 0.98, share


def test_a_row_of_two_documents_equals_the_documents_alone():
    gates, R, _ = make_inputs(1, 20, 2, 4, seed=3, with_init=False)
    doc_ids = torch.tensor([[0] * 8 + [1] * 12])
    y = slstm(gates, R, doc_ids=doc_ids)
    assert torch.allclose(y[:, :8], slstm(gates[:, :8], R), atol=1e-6)
    assert torch.allclose(y[:, 8:], slstm(gates[:, 8:], R), atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked"] + (["triton"] if TRITON else []))
def test_strided_inputs(backend):
    """Views (a time slice of a longer row, R from a transpose) give what their contiguous copies give."""
    gates, R, state0 = make_inputs(2, 24, 2, 4, seed=6)
    view, R_view = gates[:, 5:17], R.transpose(2, 3).contiguous().transpose(2, 3)
    assert not view.is_contiguous() or not R_view.is_contiguous()
    y, f, g, cot = run(lambda *a, **k: slstm(*a, **k, backend=backend), view, R_view, state0, None)
    y_c, f_c, g_c, _ = run(lambda *a, **k: slstm(*a, **k, backend=backend), view.contiguous(), R.clone(), state0,
                           None, cot)
    assert torch.equal(y, y_c) and all(torch.equal(a, b) for a, b in zip(f, f_c))
    assert all(torch.allclose(g[k], g_c[k], rtol=1e-6, atol=1e-7) for k in g)


def test_split_sequence_carries_the_state():
    gates, R, state0 = make_inputs(2, 30, 2, 4, seed=4)
    y, final = slstm(gates, R, initial_state=state0, return_final_state=True)
    y1, mid = slstm(gates[:, :13], R, initial_state=state0, return_final_state=True)
    y2, final2 = slstm(gates[:, 13:], R, initial_state=mid, return_final_state=True)
    assert torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-6)
    for a, b in zip(final, final2):
        assert torch.allclose(a, b, atol=1e-6)


def test_bfloat16_inputs_give_bfloat16_outputs_near_float32():
    gates, R, _ = make_inputs(2, 16, 2, 8, seed=5, with_init=False)
    y32 = slstm(gates, R)
    y16 = slstm(gates.bfloat16(), R.bfloat16())
    assert y16.dtype == torch.bfloat16 and relative_error(y16.float(), y32) < 2e-2


# ---- the oracle: the xLSTM authors' pointwise sLSTM cell (NX-AI/xlstm, `blocks/slstm/src/vanilla/slstm.py`,
# one file that imports torch only), read from the xlstm wheel (tests/oracles.py: never installed).


def test_reference_matches_the_xlstm_authors_cell(tmp_path):
    """Their cell takes the pre-activations Wx, Ry, b as (B, 4 * H * D) gate-major rows and the state
    stacked as (y, c, n, m) (4, B, H * D); it returns the new state stacked the same way. Their first
    step from n = 0 sets m = i~ rather than max(i~, logsigmoid(f~)): y, c / n are the same either way,
    so the check runs from a state with n > 0 and compares y, c, n and m over several steps."""
    cell = oracles.load_file("xlstm", "xlstm/blocks/slstm/src/vanilla/slstm.py", tmp_path).slstm_forward_pointwise
    B, T, H, D = 2, 12, 2, 4
    gates, R, state0 = make_inputs(B, T, H, D, seed=11, gate_scale=3.0)
    gates, R, state0 = gates.double(), R.double(), tuple(s.double() for s in state0)
    y_ref, final_ref = slstm_reference(gates, R, initial_state=state0, return_final_state=True)
    states = torch.stack([s.reshape(B, H * D) for s in state0])
    for t in range(T):
        y_prev = states[0].view(B, H, D)
        Ry = torch.einsum("bhk,ghkj->bghj", y_prev, R).reshape(B, 4 * H * D)
        states, _ = cell(gates[:, t].reshape(B, 4 * H * D), Ry, torch.zeros(1, 4 * H * D, dtype=torch.float64),
                         states, {})
        assert torch.allclose(states[0].view(B, H, D), y_ref[:, t], rtol=1e-10, atol=1e-12), t
    for ours, theirs in zip(final_ref, states):
        assert torch.allclose(ours.double(), theirs.view(B, H, D), rtol=1e-6, atol=1e-9)
