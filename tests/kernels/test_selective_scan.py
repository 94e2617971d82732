"""selective_scan: chunked and Triton (interpreter on CPU) against the reference loop."""

import pytest
import torch

from tests.kernels.test_causal_conv1d import DEVICE, make_doc_ids, triton_runnable
from undertow.kernels.selective_scan import IMPLEMENTATIONS, chunked, selective_scan
from undertow.kernels.selective_scan.reference import selective_scan_reference

if "triton" in IMPLEMENTATIONS:
    from undertow.kernels.selective_scan import triton as triton_form

BACKENDS = ["chunked"] + (["triton"] if triton_runnable(IMPLEMENTATIONS, "undertow.kernels.selective_scan.triton") else [])
TOL = {("chunked", torch.float32): 1e-5, ("triton", torch.float32): 1e-4, ("triton", torch.float16): 1e-2}


def make_inputs(Bt, T, Dc, N, dtype, *, with_init=True, full=True, seed=0):
    """Fresh random inputs; A = -exp(.) as in Mamba; with `full`, D, z and delta_bias too."""
    gen = torch.Generator().manual_seed(seed)
    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)
    return {
        "u": rnd(Bt, T, Dc), "delta": rnd(Bt, T, Dc, scale=0.5),
        "A": -torch.exp(rnd(Dc, N, scale=0.5).float()).to(dtype),
        "B": rnd(Bt, T, N), "C": rnd(Bt, T, N),
        "D": rnd(Dc) if full else None, "z": rnd(Bt, T, Dc) if full else None,
        "delta_bias": rnd(Dc, scale=0.5) if full else None,
        "initial_state": rnd(Bt, Dc, N) if with_init else None,
    }


@pytest.fixture(params=[32, 16], ids=["chunk32", "chunk16"])
def chunk(request, monkeypatch):
    """The chunked form's chunk length; 16 puts several chunk edges inside T = 33 and 100."""
    monkeypatch.setattr(chunked, "CHUNK", request.param)
    return request.param


@pytest.fixture(autouse=True)
def short_triton_chunks(monkeypatch):
    """Triton's checkpoint interval cut to 8 so the short interpreter runs cross several chunks."""
    if "triton" in IMPLEMENTATIONS:
        monkeypatch.setattr(triton_form, "CHUNK", 8)


FULL_GRID = [
    (N, T, docs, init) for N, T in [(4, 1), (16, 7), (4, 33), (16, 100)] for docs in (False, True) for init in (False, True)
]
# The interpreter runs Triton slowly on CPU: a subset that still covers every N and flag.
TRITON_GRID = [(4, 1, False, True), (16, 7, True, False), (4, 17, True, True), (16, 12, False, False)]


@pytest.mark.parametrize("N,T,with_docs,with_init", FULL_GRID)
def test_chunked_matches_reference(compare_with_reference, chunk, N, T, with_docs, with_init):
    _compare_fp32(compare_with_reference, "chunked", N, T, with_docs, with_init)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
@pytest.mark.parametrize("N,T,with_docs,with_init", TRITON_GRID)
def test_triton_matches_reference(compare_with_reference, N, T, with_docs, with_init):
    _compare_fp32(compare_with_reference, "triton", N, T, with_docs, with_init)


def _compare_fp32(compare_with_reference, backend, N, T, with_docs, with_init):
    Bt, Dc = 2, 3
    inputs = make_inputs(Bt, T, Dc, N, torch.float32, with_init=with_init, seed=T * 10 + N)
    inputs["doc_ids"] = make_doc_ids(Bt, T, seed=T) if with_docs else None
    compare_with_reference(IMPLEMENTATIONS[backend], selective_scan_reference, inputs, {}, TOL[(backend, torch.float32)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_delta_no_extras(compare_with_reference, backend):
    """delta used as given (no softplus, no bias), no D, no z; positive dt for a valid decay."""
    inputs = make_inputs(2, 13, 4, 8, torch.float32, full=False, seed=5)
    inputs["delta"] = inputs["delta"].abs()
    inputs["doc_ids"] = make_doc_ids(2, 13, seed=6)
    compare_with_reference(
        IMPLEMENTATIONS[backend], selective_scan_reference, inputs, {"delta_softplus": False},
        TOL[(backend, torch.float32)],
    )


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
@pytest.mark.parametrize("dtype,N,T", [(torch.float16, 4, 9), (torch.float16, 16, 12), (torch.bfloat16, 4, 11)])
def test_triton_low_precision(compare_with_reference, dtype, N, T):
    inputs = make_inputs(2, T, 5, N, dtype, seed=N)
    inputs["doc_ids"] = make_doc_ids(2, T, seed=N)
    compare_with_reference(IMPLEMENTATIONS["triton"], selective_scan_reference, inputs, {}, 1e-2, reference_in_float32=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 17])
def test_split_sequence_carries_state(backend, split):
    """Running [0, split) then [split, T) with final_state -> initial_state equals one pass."""
    fn = IMPLEMENTATIONS[backend]
    inputs = make_inputs(2, 24, 3, 4, torch.float32, seed=split)
    doc_ids = make_doc_ids(2, 24, seed=split, continue_at=split)
    whole, final = fn(**inputs, doc_ids=doc_ids, return_final_state=True)
    first = {k: v[:, :split] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    second = {k: v[:, split:] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    y1, mid = fn(**first, doc_ids=doc_ids[:, :split], return_final_state=True)
    second["initial_state"] = mid
    y2, end = fn(**second, doc_ids=doc_ids[:, split:], return_final_state=True)
    assert torch.allclose(torch.cat([y1, y2], 1), whole, rtol=1e-5, atol=1e-5)
    assert torch.allclose(end, final, rtol=1e-5, atol=1e-5)


def test_long_decay_stays_finite():
    """Strong decays over a long chunk: nothing overflows (no exp of a positive exponent)."""
    inputs = make_inputs(1, 200, 2, 4, torch.float32, full=False, seed=9)
    inputs["A"] = inputs["A"] * 50
    y, h = selective_scan(**inputs, backend="chunked", return_final_state=True)
    ref, h_ref = selective_scan_reference(**inputs, return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("A_scale,delta_shift", [(60.0, 0.0), (1.0, 30.0), (1.0, -8.0)], ids=["strong-A", "large-delta", "tiny-delta"])
def test_chunked_decay_ranges(compare_with_reference, chunk, A_scale, delta_shift):
    """Outputs, states and gradients where dt * A reaches log(TINY_DECAY) (strong A, large delta:
    the chunked form's threshold path) and where dt is tiny (decays ~1: the path without it)."""
    inputs = make_inputs(2, 45, 3, 8, torch.float32, seed=21)
    inputs["A"] = inputs["A"] * A_scale
    inputs["delta"] = inputs["delta"] + delta_shift
    inputs["doc_ids"] = make_doc_ids(2, 45, seed=22)
    compare_with_reference(IMPLEMENTATIONS["chunked"], selective_scan_reference, inputs, {}, TOL[("chunked", torch.float32)])


def test_chunked_threshold_path_taken(monkeypatch):
    """The decay-range check picks the threshold pass exactly when some dt * A can go under
    log(TINY_DECAY), with dt of either sign (delta used as given)."""
    seen = []
    real_plan = chunked._Plan

    def spy(*args):
        plan = real_plan(*args)
        seen.append(plan.tiny)
        return plan

    monkeypatch.setattr(chunked, "_Plan", spy)
    inputs = make_inputs(1, 9, 2, 4, torch.float32, full=False, seed=23)
    inputs["A"] = torch.full((2, 4), -1.0, device=DEVICE)
    for delta, expected in [(0.5, False), (80.0, True), (-0.5, False), (-80.0, False)]:
        inputs["delta"] = torch.full((1, 9, 2), delta, device=DEVICE)
        selective_scan(**inputs, delta_softplus=False, backend="chunked")
        assert seen[-1] is expected, (delta, seen)
    inputs["A"] = torch.full((2, 4), 1.0, device=DEVICE)  # a growing state: positive dt * A, fine
    inputs["delta"] = torch.full((1, 9, 2), -80.0, device=DEVICE)
    selective_scan(**inputs, delta_softplus=False, backend="chunked")
    assert seen[-1] is True


def test_dispatch_forced_and_unknown(monkeypatch):
    inputs = make_inputs(1, 5, 2, 4, torch.float32)
    ref = selective_scan(**inputs, backend="reference")
    for backend in BACKENDS:
        assert torch.allclose(selective_scan(**inputs, backend=backend), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        selective_scan(**inputs, backend="cuda-magic")
    monkeypatch.setenv("UNDERTOW_KERNEL_BACKEND", "chunked")
    assert torch.allclose(selective_scan(**inputs), ref, rtol=1e-5, atol=1e-6)


def test_bad_shape_raises():
    inputs = make_inputs(1, 5, 2, 4, torch.float32)
    inputs["B"] = torch.randn(1, 5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(**inputs, backend="chunked")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
def test_triton_d_state_256(compare_with_reference):
    inputs = make_inputs(1, 4, 2, 256, torch.float32, seed=11)
    inputs["doc_ids"] = torch.tensor([[0, 0, 1, 1]], device=DEVICE)
    compare_with_reference(IMPLEMENTATIONS["triton"], selective_scan_reference, inputs, {}, 1e-4)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
def test_triton_d_state_above_256_raises():
    with pytest.raises(ValueError, match="d_state"):
        selective_scan(**make_inputs(1, 2, 2, 257, torch.float32), backend="triton")


def test_chunked_bf16(compare_with_reference):
    inputs = make_inputs(2, 40, 4, 8, torch.bfloat16, seed=12)
    inputs["doc_ids"] = make_doc_ids(2, 40, seed=12)
    compare_with_reference(IMPLEMENTATIONS["chunked"], selective_scan_reference, inputs, {}, 1e-2, reference_in_float32=True)
