"""selective_scan: chunked and Triton (interpreter on CPU) against the reference loop."""

import pytest
import torch

from tests.kernels.conftest import relative_error
from tests.kernels.test_causal_conv1d import DEVICE, make_doc_ids, triton_runnable
from undertow.kernels import native
from undertow.kernels.selective_scan import IMPLEMENTATIONS, chunked, selective_scan
from undertow.kernels.selective_scan import native as scan_native
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


@pytest.fixture(params=["native", "torch"])
def cpu_forward(request, monkeypatch):
    """The chunked form's forward: the native CPU loop (which must build where a compiler is) or
    the PyTorch loop."""
    if request.param == "native":
        if DEVICE != "cpu":
            pytest.skip("the native loop runs on CPU tensors only")
        if native.find_compiler() is None:
            pytest.skip("no C++ compiler: the native loop cannot be built here")
        assert scan_native._library() is not None, native.unavailable_reason(scan_native.NAME)
    monkeypatch.setattr(scan_native, "ENABLED", request.param == "native")
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
def test_chunked_matches_reference(compare_with_reference, chunk, cpu_forward, N, T, with_docs, with_init):
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


def test_long_decay_stays_finite(cpu_forward):
    """Strong decays over a long chunk: nothing overflows (no exp of a positive exponent)."""
    inputs = make_inputs(1, 200, 2, 4, torch.float32, full=False, seed=9)
    inputs["A"] = inputs["A"] * 50
    y, h = selective_scan(**inputs, backend="chunked", return_final_state=True)
    ref, h_ref = selective_scan_reference(**inputs, return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("A_scale,delta_shift", [(60.0, 0.0), (1.0, 30.0), (1.0, -8.0)], ids=["strong-A", "large-delta", "tiny-delta"])
def test_chunked_decay_ranges(compare_with_reference, chunk, cpu_forward, A_scale, delta_shift):
    """Outputs, states and gradients where dt * A reaches log(TINY_DECAY) (strong A, large delta:
    the chunked form's threshold path) and where dt is tiny (decays ~1: the path without it)."""
    inputs = make_inputs(2, 45, 3, 8, torch.float32, seed=21)
    inputs["A"] = inputs["A"] * A_scale
    inputs["delta"] = inputs["delta"] + delta_shift
    inputs["doc_ids"] = make_doc_ids(2, 45, seed=22)
    compare_with_reference(IMPLEMENTATIONS["chunked"], selective_scan_reference, inputs, {}, TOL[("chunked", torch.float32)])


def test_chunked_threshold_path_taken(monkeypatch):
    """The decay-range check picks the threshold pass exactly when some dt * A can go under
    log(TINY_DECAY), with dt of either sign (delta used as given). The PyTorch forward: the
    native one makes no plan."""
    monkeypatch.setattr(scan_native, "ENABLED", False)
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


@pytest.mark.parametrize("Bt,T,Dc,N", [(3, 70, 37, 5), (1, 20, 16, 256), (2, 33, 40, 1)], ids=["partial-block", "d_state-256", "d_state-1"])
def test_chunked_wide_channels(compare_with_reference, chunk, cpu_forward, Bt, T, Dc, N):
    """Channel counts that fill, span and end partway through the native loop's 16-channel rows;
    odd, single and the largest d_state."""
    inputs = make_inputs(Bt, T, Dc, N, torch.float32, seed=Dc + N)
    inputs["doc_ids"] = make_doc_ids(Bt, T, seed=N)
    compare_with_reference(IMPLEMENTATIONS["chunked"], selective_scan_reference, inputs, {}, TOL[("chunked", torch.float32)])


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_chunked_nan_propagates(cpu_forward, grad):
    """A NaN input reaches the output and the state (never hidden by a clamp)."""
    inputs = make_inputs(1, 10, 17, 4, torch.float32, full=False, seed=31)
    inputs["delta"][0, 3, 16] = float("nan")
    inputs["u"].requires_grad_(grad)
    y, h = selective_scan(**inputs, backend="chunked", return_final_state=True)
    assert torch.isnan(y[0, 3:, 16]).all() and torch.isnan(h[0, 16]).all()
    assert torch.isfinite(y[0, :, :16]).all() and torch.isfinite(y[0, :3]).all()


def test_native_and_torch_forwards_agree(monkeypatch):
    """The two CPU forwards of the chunked form: outputs, every chunk's incoming state and the
    final state, to float32 rounding, with resets and strong decays (the TINY_DECAY threshold)."""
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler")
    gen = torch.Generator().manual_seed(3)
    Bt, T, Dc, N = 2, 75, 21, 6
    u, B, C = torch.randn(Bt, T, Dc, generator=gen), torch.randn(Bt, T, N, generator=gen), torch.randn(Bt, T, N, generator=gen)
    dt = torch.rand(Bt, T, Dc, generator=gen) * 3
    A = -torch.exp(2 * torch.randn(Dc, N, generator=gen))
    h0 = torch.randn(Bt, N, Dc, generator=gen)
    starts = torch.rand(Bt, T, generator=gen) < 0.05
    grow = scan_native.may_grow(A, scan_native.dt_floor(dt))
    y, incoming, final = scan_native.native_forward(u, dt, A, B, C, h0, starts, 16, chunked.TINY_DECAY, grow)
    monkeypatch.setattr(scan_native, "ENABLED", False)
    assert scan_native.native_forward(u, dt, A, B, C, h0, starts, 16, chunked.TINY_DECAY, grow) is None
    plan = chunked._Plan(u, dt, A, B, C, starts, 16)
    assert plan.tiny  # the threshold is exercised
    h, a_buf, h_buf = h0, plan.buffer(), plan.buffer()
    for i, (c0, n) in enumerate(plan.chunks()):
        torch.testing.assert_close(incoming[i], h, rtol=2e-6, atol=1e-6)
        H = plan.states_(h_buf, plan.decays_(a_buf, c0, n), h, c0, n)
        torch.testing.assert_close(y[:, c0:c0 + n], torch.einsum("tbn,tbnd->btd", plan.C[c0:c0 + n], H[:n]), rtol=2e-6, atol=1e-5)
        h = H[n - 1].clone()
    torch.testing.assert_close(final, h, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("full,softplus,with_docs,with_init", [
    (True, True, True, True), (False, True, False, False), (True, False, True, False), (False, False, True, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_inference_matches_reference(cpu_forward, full, softplus, with_docs, with_init, dtype):
    """Calls without gradients: on CPU the native loop runs the whole op (softplus, D, z inside)."""
    Bt, T, Dc, N = 2, 45, 19, 6
    inputs = make_inputs(Bt, T, Dc, N, dtype, with_init=with_init, full=full, seed=40 + full + 2 * softplus)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()
    inputs["doc_ids"] = make_doc_ids(Bt, T, seed=41) if with_docs else None
    reference = {k: v.float() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
    y_ref, h_ref = selective_scan_reference(**reference, delta_softplus=softplus, return_final_state=True)
    with torch.no_grad():
        y, h = selective_scan(**inputs, delta_softplus=softplus, backend="chunked", return_final_state=True)
    assert y.dtype == dtype and h.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    assert relative_error(y.float(), y_ref) <= tol and relative_error(h, h_ref) <= 1e-5
    leaf = {k: v.clone().requires_grad_(True) if k == "u" else v for k, v in inputs.items()}
    y_grad = selective_scan(**leaf, delta_softplus=softplus, backend="chunked")  # the autograd path
    assert relative_error(y_grad.detach().float(), y.float()) <= tol


def test_chunked_inference_softplus_range(cpu_forward):
    """softplus over its whole range (log1p's small end, the threshold at 20, NaN) and a z gate
    far out on both sides, without gradients, against the reference."""
    Bt, T, Dc, N = 1, 12, 16, 3
    inputs = make_inputs(Bt, T, Dc, N, torch.float32, seed=50)
    inputs["delta"] = torch.linspace(-40, 40, T * Dc).view(Bt, T, Dc)
    inputs["delta_bias"] = None
    inputs["z"] = torch.linspace(-100, 100, T * Dc).view(Bt, T, Dc)
    inputs["A"] = -torch.rand(Dc, N) * 0.1  # keeps dt = 40 from wiping out every state
    y_ref, h_ref = selective_scan_reference(**inputs, return_final_state=True)
    with torch.no_grad():
        y, h = selective_scan(**inputs, backend="chunked", return_final_state=True)
    assert relative_error(y, y_ref) <= 1e-5 and relative_error(h, h_ref) <= 1e-5
    inputs["delta"][0, 5, 3] = float("nan")
    with torch.no_grad():
        y = selective_scan(**inputs, backend="chunked")
    assert torch.isnan(y[0, 5:, 3]).all() and torch.isfinite(y[0, :5]).all() and torch.isfinite(y[0, :, 4:]).all()


def test_chunked_under_torch_compile(cpu_forward):
    """torch.compile around the op (trainer's `compile`): the native loop runs eagerly inside the
    compiled function (never traced with fake tensors), with and without gradients."""
    inputs = make_inputs(2, 20, 18, 4, torch.float32, seed=60)
    inputs["doc_ids"] = make_doc_ids(2, 20, seed=61)
    u = inputs.pop("u")

    def loss(u):
        return selective_scan(u, **inputs, backend="chunked").square().sum()

    leaf = u.clone().requires_grad_(True)
    expected = loss(leaf)
    expected.backward()
    compiled_leaf = u.clone().requires_grad_(True)
    got = torch.compile(loss, backend="eager")(compiled_leaf)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_leaf.grad, leaf.grad)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(loss, backend="eager")(u), expected)


@pytest.mark.parametrize("with_final_grad", [True, False])
def test_native_backward_matches_the_pytorch_backward(monkeypatch, with_final_grad):
    """The chunked form's two CPU backwards, from the same forward: every gradient, with resets,
    decays under TINY_DECAY, 21 channels (a partial 16-channel row) and d_state 5."""
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler")
    gen = torch.Generator().manual_seed(7)
    Bt, T, Dc, N = 2, 75, 21, 5
    leaves = {"u": torch.randn(Bt, T, Dc, generator=gen), "dt": torch.rand(Bt, T, Dc, generator=gen) * 3,
              "A": -torch.exp(2 * torch.randn(Dc, N, generator=gen)), "B": torch.randn(Bt, T, N, generator=gen),
              "C": torch.randn(Bt, T, N, generator=gen), "h0": torch.randn(Bt, Dc, N, generator=gen)}
    starts = torch.rand(Bt, T, generator=gen) < 0.05
    dy, dh = torch.randn(Bt, T, Dc, generator=gen), torch.randn(Bt, Dc, N, generator=gen)
    grads = {}
    for enabled in (True, False):
        monkeypatch.setattr(scan_native, "ENABLED", enabled)
        inputs = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        y, h = chunked._ScanCore.apply(*inputs.values(), starts, 16)
        ((y * dy).sum() + ((h * dh).sum() if with_final_grad else 0)).backward()
        grads[enabled] = {k: v.grad for k, v in inputs.items()}
    for name in leaves:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("grow", ["positive-A", "negative-dt"])
def test_chunked_growing_state(compare_with_reference, cpu_forward, grow):
    """dt * A > 0 somewhere (decays above 1): the loops' overflow-clamped exp2 path, with and
    without gradients."""
    inputs = make_inputs(2, 30, 20, 4, torch.float32, full=False, seed=70)
    inputs["doc_ids"] = make_doc_ids(2, 30, seed=71)
    if grow == "positive-A":
        inputs["A"] = inputs["A"].abs() * 0.05
        inputs["delta"] = inputs["delta"].abs()
    else:
        inputs["A"] = inputs["A"] * 0.05
        inputs["delta"] = -inputs["delta"].abs()
    kwargs = {"delta_softplus": False}
    compare_with_reference(IMPLEMENTATIONS["chunked"], selective_scan_reference, inputs, kwargs, 1e-5)
    y_ref, h_ref = selective_scan_reference(**inputs, **kwargs, return_final_state=True)
    with torch.no_grad():
        y, h = selective_scan(**inputs, **kwargs, backend="chunked", return_final_state=True)
    assert relative_error(y, y_ref) <= 1e-5 and relative_error(h, h_ref) <= 1e-5


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_chunked_overflowing_state_is_not_hidden(cpu_forward, grad):
    """Decays of e^200: the reference overflows to inf; so must the chunked form (the native
    exp2 clamps its exponent, never wraps it into a small or negative number)."""
    ones = torch.ones(1, 3, 1)
    inputs = {"u": torch.zeros(1, 3, 1, requires_grad=grad), "delta": ones, "A": torch.full((1, 1), 200.0),
              "B": ones, "C": ones, "initial_state": torch.ones(1, 1, 1)}
    y_ref = selective_scan_reference(**inputs, delta_softplus=False)
    y = selective_scan(**inputs, delta_softplus=False, backend="chunked")
    assert not torch.isfinite(y_ref).all()
    assert not torch.isfinite(y).all() and (y.detach() > 1e30).all()
