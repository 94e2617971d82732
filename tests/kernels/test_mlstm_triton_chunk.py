"""mlstm's chunkwise Triton form (triton_chunk.py, the default "triton" backend) against autograd through
the reference in float64 on the same input values: outputs, final (C, n, m) and the gradients of q, k,
v, i, f and of the initial (C, n, m), in every gate regime of test_mlstm.py (each side of the
stabilizer's max and of max(|n^T q|, exp(-m)) wins), documents inside and across chunks, lengths that
are not multiples of the chunk, several v tiles and heads. On CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1) at tiny shapes."""

import pytest
import torch

from tests.kernels.test_causal_conv1d import DEVICE, triton_runnable
from tests.kernels.test_mlstm import GATES, INPUTS, doc_ids_for, errors_against_reference, make_inputs
from undertow.kernels.mlstm import IMPLEMENTATIONS, mlstm

TRITON = triton_runnable(IMPLEMENTATIONS, "undertow.kernels.mlstm.triton_chunk")
pytestmark = pytest.mark.skipif(not TRITON,
                                reason="the Triton form runs on CUDA or in the interpreter (TRITON_INTERPRET=1)")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture
def v_tile(monkeypatch):
    """set(width): caps the v tile (at least 16, tl.dot's smallest side), so Dv = 20 splits in two programs."""
    from undertow.kernels.mlstm import triton_chunk_common

    return lambda width: monkeypatch.setattr(triton_chunk_common, "BLOCK_V", width)


def chunk_on_device(q, k, v, i, f, *, initial_state=None, doc_ids=None, **kwargs):
    """The chunkwise Triton form on DEVICE for CPU tensors, results back on the CPU (differentiable moves)."""
    from undertow.kernels.mlstm.triton_chunk import mlstm_triton_chunk

    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    init = None if initial_state is None else tuple(move(s) for s in initial_state)
    h, (C, n, m) = mlstm_triton_chunk(*(move(t) for t in (q, k, v, i, f)), initial_state=init,
                                      doc_ids=move(doc_ids), **kwargs)
    return h.cpu(), (C.cpu(), n.cpu(), m.cpu())


def chunk_errors(inputs: dict, chunk: int, doc_ids) -> dict:
    """Relative errors on `inputs` (CPU) against the reference on their float64 values."""
    exact = {name: inputs[name].double() for name in INPUTS}
    if inputs.get("initial_state") is not None:
        exact["initial_state"] = tuple(s.double() for s in inputs["initial_state"])
    return errors_against_reference(chunk_on_device, inputs, {"chunk_size": chunk, "doc_ids": doc_ids}, exact)


def assert_errors_below(errors: dict, tol: float) -> None:
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


@pytest.mark.parametrize("gates", list(GATES))
def test_every_gate_regime_with_documents_across_chunks(gates):
    """T = 21 in chunks of 4 (the last chunk one token), starts on chunk edges and inside chunks, carried
    initial state; Dqk = 8, Dv = 6 (masked lanes of the 16-wide tiles)."""
    inputs = make_inputs(2, 21, 1, 8, 6, torch.float32, seed=len(gates), gates=gates)
    assert_errors_below(chunk_errors(inputs, 4, doc_ids_for("edges", 2, 21, 4)), TOL[torch.float32])


@pytest.mark.parametrize("T, H, Dqk, Dv, chunk, docs, init, gates", [
    (1, 1, 4, 8, 4, "none", True, "mixed"),  # one token, a chunk longer than the row
    (11, 1, 8, 4, 4, "inside", False, "weak_forget"),  # the zero state (m = 0)
    (13, 2, 6, 20, 5, "inside", True, "mixed"),  # two v tiles (16 + 4 masked), chunks that divide nothing
    (18, 1, 5, 6, 17, "inside", True, "strong_forget"),  # a token tile of 32 (next power of two of 17)
    (12, 3, 4, 6, 3, "none", True, "large_input"),  # three heads, chunk 3 (token tile 16, mostly masked)
])
def test_shapes_chunks_tiles_and_heads(T, H, Dqk, Dv, chunk, docs, init, gates, v_tile):
    v_tile(16)
    inputs = make_inputs(2, T, H, Dqk, Dv, torch.float32, seed=T + Dqk, init=init, gates=gates)
    assert_errors_below(chunk_errors(inputs, chunk, doc_ids_for(docs, 2, T, chunk)), TOL[torch.float32])


def test_both_sides_of_both_maxes_win():
    """The regimes of the test above really exercise each branch: per token, the stabilizer's max is won
    by the carried side g_t and by the intra-chunk D somewhere, and the denominator's max by |den| and by
    exp(-m) somewhere (read from the forward's per-token m_t and den_t)."""
    from undertow.kernels.mlstm.triton_chunk import chunk_forward

    wins = {"g": False, "D": False, "|den|": False, "exp(-m)": False}
    for gates in GATES:
        made = make_inputs(2, 21, 1, 8, 6, torch.float32, seed=len(gates), gates=gates)
        x = {k: made[k].to(DEVICE) for k in INPUTS}
        seg = torch.zeros(2, 21, dtype=torch.int32, device=DEVICE)
        _, _, (m, den, inter) = chunk_forward(x["q"], x["k"], x["v"], x["i"], x["f"], None, None, None, seg, 1e-6, 4,
                                              store=True)
        wins["g"] |= bool((inter == 1.0).any())  # m_t = g_t: the carried state's weight exp(g - m) is 1
        wins["D"] |= bool((inter < 1.0).any())
        wins["|den|"] |= bool((den.abs() > torch.exp(-m)).any())
        wins["exp(-m)"] |= bool((den.abs() < torch.exp(-m)).any())
    assert all(wins.values()), wins


def test_stabilizer_ties_get_the_reference_gradient():
    """f~ = 1000 (logsigmoid exactly 0), the zero state, i~ = 0 every third step: the stabilizer's max ties
    (test_mlstm_triton.py shows the reference's d i~ there differs from both one-sided ones by > 1%). The
    backward routes m's gradient as the reference's recurrence does, so it matches there too."""
    from tests.kernels.test_mlstm_triton import _tied_inputs

    assert_errors_below(chunk_errors(_tied_inputs(0.0), 4, None), TOL[torch.float32])


def test_pytorch_backward_gives_the_same_gradients(monkeypatch):
    """UNDERTOW_MLSTM_CHUNK_BWD=pytorch (autograd through chunked.py recomputed: the fallback) against the
    reference, and unknown values refused by name."""
    monkeypatch.setenv("UNDERTOW_MLSTM_CHUNK_BWD", "pytorch")
    inputs = make_inputs(2, 13, 1, 8, 6, torch.float32, seed=4)
    assert_errors_below(chunk_errors(inputs, 4, doc_ids_for("inside", 2, 13, 4)), TOL[torch.float32])
    monkeypatch.setenv("UNDERTOW_MLSTM_CHUNK_BWD", "cuda")
    with pytest.raises(ValueError, match="UNDERTOW_MLSTM_CHUNK_BWD='cuda'"):
        chunk_errors(inputs, 4, None)


def test_forward_without_gradient_equals_training_forward():
    """Under no_grad no per-token tensors are written: same h and final state, bit for bit."""
    x = {k: (tuple(s.to(DEVICE) for s in v) if isinstance(v, tuple) else v.to(DEVICE))
         for k, v in make_inputs(2, 11, 1, 4, 6, torch.float32, seed=5).items()}
    kwargs = dict(chunk_size=4, doc_ids=doc_ids_for("inside", 2, 11, 4).to(DEVICE), return_final_state=True,
                  backend="triton")
    with torch.no_grad():
        h, final = mlstm(**x, **kwargs)
    leaves = {name: x[name].clone().requires_grad_() for name in INPUTS}
    h_train, final_train = mlstm(**leaves, initial_state=x["initial_state"], **kwargs)
    assert torch.equal(h, h_train.detach()) and all(torch.equal(a, b) for a, b in zip(final, final_train))


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
def test_half_precision_gradients(dtype):
    """Half inputs, every gradient, at the half tolerance (bf16 on a GPU only)."""
    inputs = make_inputs(2, 17, 1, 8, 6, dtype, seed=3)
    assert_errors_below(chunk_errors(inputs, 4, doc_ids_for("inside", 2, 17, 4)), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
def test_half_precision_forward(dtype):
    """Half inputs: tl.dot in the half type with float32 accumulation (as TFLA). Forward and final state;
    bf16 on a GPU only (the interpreter's bf16 is not trusted)."""
    inputs = make_inputs(2, 17, 1, 8, 6, dtype, seed=3)
    exact = {name: inputs[name].double() for name in INPUTS} | {
        "initial_state": tuple(s.double() for s in inputs["initial_state"])}
    ids = doc_ids_for("inside", 2, 17, 4)
    with torch.no_grad():
        h, final = chunk_on_device(**inputs, chunk_size=4, doc_ids=ids, return_final_state=True)
        h_ref, final_ref = IMPLEMENTATIONS["reference"](**exact, doc_ids=ids, return_final_state=True)
    assert h.dtype == dtype
    for out, ref in zip((h, *final), (h_ref, *final_ref)):
        assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL[dtype]


def test_triton_backend_is_the_chunkwise_form(monkeypatch):
    """mlstm(backend="triton") runs triton_chunk.py by default; UNDERTOW_MLSTM_TRITON picks the form by name."""
    from undertow.kernels.mlstm import triton_chunk

    calls = []
    monkeypatch.setattr(triton_chunk, "mlstm_triton_chunk", lambda *a, **k: calls.append(1) or a[0])
    q = torch.randn(1, 3, 1, 4, device=DEVICE)
    gates = torch.randn(1, 3, 1, device=DEVICE)
    mlstm(q, q, q, gates, gates, backend="triton")
    assert calls == [1]
    monkeypatch.setenv("UNDERTOW_MLSTM_TRITON", "fused")
    with pytest.raises(ValueError, match="UNDERTOW_MLSTM_TRITON='fused'"):
        mlstm(q, q, q, gates, gates, backend="triton")


def test_strided_inputs():
    """q, k, v as views of a fused projection and a strided f give their contiguous copies' result."""
    inputs = make_inputs(1, 7, 2, 4, 4, torch.float32, seed=9)
    fused = torch.cat([inputs["q"], inputs["k"], inputs["v"]], dim=-1).to(DEVICE)
    views = {"q": fused[..., :4], "k": fused[..., 4:8], "v": fused[..., 8:], "i": inputs["i"].to(DEVICE),
             "f": torch.nn.functional.pad(inputs["f"], (0, 1))[..., :2].to(DEVICE)}
    assert not views["q"].is_contiguous() and not views["f"].is_contiguous()
    h = mlstm(**views, chunk_size=4, backend="triton")
    h_contiguous = mlstm(**{k: v.contiguous() for k, v in views.items()}, chunk_size=4, backend="triton")
    torch.testing.assert_close(h, h_contiguous, rtol=0, atol=0)


def test_head_dim_above_the_tile_is_refused_by_name():
    from undertow.kernels.mlstm.triton_chunk import mlstm_triton_chunk

    q = torch.randn(1, 2, 1, 257, device=DEVICE)
    gates = torch.randn(1, 2, 1, device=DEVICE)
    with pytest.raises(ValueError, match="Dqk=257"):
        mlstm_triton_chunk(q, q, q[..., :4], gates, gates)


def test_float64_is_refused_by_name():
    from undertow.kernels.mlstm.triton_chunk import mlstm_triton_chunk

    inputs = make_inputs(1, 3, 1, 4, 4, torch.float64, seed=1)
    with pytest.raises(ValueError, match="float64"):
        mlstm_triton_chunk(**{k: (tuple(s.to(DEVICE) for s in v) if isinstance(v, tuple) else v.to(DEVICE))
                              for k, v in inputs.items()})
