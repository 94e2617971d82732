"""ssd: chunked and Triton (interpreter on CPU, compiled on CUDA) against the reference loop."""

import pytest
import torch

from undertow.kernels.ssd import IMPLEMENTATIONS, ssd
from undertow.kernels.ssd.reference import ssd_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = "triton" in IMPLEMENTATIONS
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TRITON_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def doc_ids_for(kind: str, Bt: int, T: int, chunk: int) -> torch.Tensor | None:
    """None, or (Bt, T) ids with starts inside chunks ("inside"), or on a chunk's last and first
    tokens and their neighbours ("edges"); row 1 has every other start of row 0."""
    if kind == "none":
        return None
    edges = [chunk - 1, chunk, chunk + 1, 2 * chunk, 2 * chunk + 2]
    starts = {"inside": [3, chunk + 5, 2 * chunk + 1], "edges": edges}[kind]
    ids = torch.zeros(Bt, T, dtype=torch.long)
    for row in range(Bt):
        for s in starts if row == 0 else starts[1::2]:
            if 0 < s < T:
                ids[row, s:] += 1
    return ids.to(DEVICE)


def make_inputs(Bt, T, H, P, G, N, dtype, *, seed, init=True, D_shape="H", z=True, bias=True):
    """Fresh random inputs in Mamba-2's ranges: A = -exp(.) < 0, dt pre-softplus around 0."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)

    return {
        "x": rnd(Bt, T, H, P).to(dtype), "dt": rnd(Bt, T, H, scale=0.7), "A": -torch.exp(rnd(H, scale=0.5)),
        "B": rnd(Bt, T, G, N).to(dtype), "C": rnd(Bt, T, G, N).to(dtype),
        "D": (rnd(H) if D_shape == "H" else rnd(H, P)) if D_shape else None,
        "z": rnd(Bt, T, H, P).to(dtype) if z else None, "dt_bias": rnd(H, scale=0.5) if bias else None,
        "initial_state": rnd(Bt, H, P, N) if init else None,
    }


def check(compare_with_reference, backend, inputs, tol, chunk, **kwargs):
    """The backend against the reference (which takes no chunk_size), with seeded cotangents: A's
    gradient is one sum over every token whose float32 rounding in the reference alone reaches ~1e-5
    for unlucky draws; a seed keeps every run identical."""
    def reference(*args, chunk_size, **rest):
        return ssd_reference(*args, **rest)

    torch.manual_seed(0)
    compare_with_reference(IMPLEMENTATIONS[backend], reference, inputs, {"chunk_size": chunk, **kwargs}, tol)


# One token from a zero state is left out: A's true gradient is then exactly 0 and a relative error
# is undefined; T = 1 is covered with a carried-in state.
@pytest.mark.parametrize("T,init", [(1, True), (15, False), (15, True), (37, False), (37, True)])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("docs", ["none", "inside", "edges"])
def test_chunked_matches_reference(compare_with_reference, T, G, docs, init):
    inputs = make_inputs(2, T, 4, 8, G, 6, torch.float32, seed=T * 7 + G, init=init, D_shape="H" if init else "HP")
    inputs["doc_ids"] = doc_ids_for(docs, 2, T, 16)
    check(compare_with_reference, "chunked", inputs, TOL[torch.float32], 16)


def test_chunked_whole_chunks(compare_with_reference):
    """T a multiple of the chunk: no padding is added (the chunked form skips the copy)."""
    inputs = make_inputs(2, 32, 4, 8, 1, 6, torch.float32, seed=41)
    inputs["doc_ids"] = doc_ids_for("inside", 2, 32, 16)
    check(compare_with_reference, "chunked", inputs, TOL[torch.float32], 16)


def test_chunked_plain_dt_limit_no_extras(compare_with_reference):
    """dt used as given (positive, no softplus, no bias) and clamped by dt_limit; no D, no z."""
    inputs = make_inputs(2, 29, 2, 8, 1, 4, torch.float32, seed=3, D_shape=None, z=False, bias=False)
    inputs["dt"] = inputs["dt"].abs()
    inputs["doc_ids"] = doc_ids_for("inside", 2, 29, 8)
    check(compare_with_reference, "chunked", inputs, TOL[torch.float32], 8, dt_softplus=False, dt_limit=(0.05, 0.8))


@pytest.mark.parametrize("P,N", [(64, 256), (128, 128)])
def test_chunked_large_head_and_state(compare_with_reference, P, N):
    """Head dims 64 and 128, d_state up to 256, chunk not dividing T."""
    inputs = make_inputs(1, 21, 2, P, 1, N, torch.float32, seed=11)
    inputs["doc_ids"] = doc_ids_for("inside", 1, 21, 8)
    check(compare_with_reference, "chunked", inputs, TOL[torch.float32], 8)


@pytest.mark.parametrize("backend", ["chunked"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("seed", [2, 3])
def test_strong_decays(compare_with_reference, backend, seed):
    """A x 40 (decays down to ~e^-28 a step, where A's gradient is small beside the terms it is made
    of): A's gradient stays within 1e-4 of the float32 reference. The decay matrix's diagonal carries
    no gradient and the outgoing-state term's gradient is a prefix sum, not a total minus a suffix;
    before, the cancelling pairs left 1e-3 (chunked) to 5e-2 (Triton) of A's gradient."""
    inputs = make_inputs(2, 37, 2, 8, 2, 6, torch.float32, seed=seed)
    inputs["A"] = inputs["A"] * 40
    inputs["doc_ids"] = doc_ids_for("inside", 2, 37, 16)
    check(compare_with_reference, backend, inputs, 1e-4, 16)


def test_chunked_bf16(compare_with_reference):
    inputs = make_inputs(2, 37, 4, 8, 2, 6, torch.bfloat16, seed=5)
    inputs["doc_ids"] = doc_ids_for("inside", 2, 37, 16)
    check(compare_with_reference, "chunked", inputs, TOL[torch.bfloat16], 16)


TRITON_CASES = [  # (T, G, docs, init, D shape): tiny shapes for the interpreter
    (1, 1, "none", True, "H"),
    (15, 2, "none", False, "HP"),
    (37, 1, "inside", True, "HP"),
    (37, 2, "edges", True, "H"),
    (37, 2, "inside", False, "H"),
]


@needs_triton
@pytest.mark.parametrize("T,G,docs,init,D_shape", TRITON_CASES)
def test_triton_matches_reference_fp32(compare_with_reference, T, G, docs, init, D_shape):
    inputs = make_inputs(2, T, 2, 8, G, 6, torch.float32, seed=T + G, init=init, D_shape=D_shape)
    inputs["doc_ids"] = doc_ids_for(docs, 2, T, 16)
    check(compare_with_reference, "triton", inputs, TRITON_TOL[torch.float32], 16)


LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # the interpreter's bf16 dot is wrong


BACKWARD_FORMS = ["split", "fused"]  # UNDERTOW_SSD_BWD: the default three scan kernels, the earlier two


@needs_triton
@pytest.mark.parametrize("form", BACKWARD_FORMS)
@pytest.mark.parametrize("z", [True, False], ids=["z", "no_z"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_triton_matches_reference_low_precision(compare_with_reference, monkeypatch, dtype, z, form):
    """With z the scan's y and dy are float32; without it dy has x's dtype and the backward multiplies
    dy by x in that dtype, and dt is 16-bit too."""
    monkeypatch.setenv("UNDERTOW_SSD_BWD", form)
    inputs = make_inputs(2, 37, 2, 8, 2, 6, dtype, seed=17 + z, z=z)
    if not z:  # dt in the 16-bit dtype too, as a bf16 model passes it: its gradient comes back in that dtype
        inputs["dt"] = inputs["dt"].to(dtype)
    inputs["doc_ids"] = doc_ids_for("inside", 2, 37, 16)
    check(compare_with_reference, "triton", inputs, TRITON_TOL[dtype], 16)


@needs_triton
def test_triton_head_dim_64(compare_with_reference):
    """A real head dim (64) and d_state (32), chunk 32 with a boundary inside it."""
    inputs = make_inputs(1, 40, 2, 64, 1, 32, torch.float32, seed=23)
    inputs["doc_ids"] = doc_ids_for("inside", 1, 40, 32)
    check(compare_with_reference, "triton", inputs, TRITON_TOL[torch.float32], 32)


@needs_triton
@pytest.mark.parametrize("softplus,bias", [(False, False), (True, True)], ids=["plain", "softplus_bias"])
def test_triton_dt_limit(compare_with_reference, softplus, bias):
    """The dt prologue kernel: dt as given (positive, no softplus, no bias) or softplus(dt + bias), clamped
    by dt_limit (a part of the tokens on each side: the clamp's gradient is zero there); no D, no z."""
    inputs = make_inputs(2, 29, 2, 8, 1, 4, torch.float32, seed=61 + softplus, D_shape=None, z=False, bias=bias)
    if not softplus:
        inputs["dt"] = inputs["dt"].abs()
    inputs["doc_ids"] = doc_ids_for("inside", 2, 29, 8)
    check(compare_with_reference, "triton", inputs, TRITON_TOL[torch.float32], 8, dt_softplus=softplus,
          dt_limit=(0.3, 1.2))


@needs_triton
@pytest.mark.parametrize("form", BACKWARD_FORMS)
@pytest.mark.parametrize("G,heads", [(1, 2), (2, 8)])
def test_triton_several_heads_per_program(compare_with_reference, monkeypatch, G, heads, form):
    """Backward programs over several heads of one group: 4 heads, G=1, 2 a program (two partial dB / dC
    sums per group, added in PyTorch); G=2 with up to 8 a program (a whole group per program)."""
    monkeypatch.setenv("UNDERTOW_SSD_TILES", f"heads={heads}")
    monkeypatch.setenv("UNDERTOW_SSD_BWD", form)
    inputs = make_inputs(2, 37, 4, 8, G, 6, torch.float32, seed=53 + G)
    inputs["doc_ids"] = doc_ids_for("edges", 2, 37, 16)
    check(compare_with_reference, "triton", inputs, TRITON_TOL[torch.float32], 16)


@pytest.mark.parametrize("backend", ["chunked"] + (["triton"] if HAS_TRITON else []))
def test_split_and_carry_equals_whole(backend):
    """Running [0, 20) then [20, 37) from the first part's final state gives the whole row's result."""
    inputs = make_inputs(2, 37, 2, 8, 1, 6, torch.float32, seed=31)
    doc_ids = doc_ids_for("inside", 2, 37, 16)
    fn = IMPLEMENTATIONS[backend]
    y, final = fn(**inputs, doc_ids=doc_ids, chunk_size=16, return_final_state=True)
    first = {k: (v[:, :20] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    second = {k: (v[:, 20:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    y1, s1 = fn(**first, doc_ids=doc_ids[:, :20], chunk_size=16, return_final_state=True)
    second["initial_state"] = s1
    y2, s2 = fn(**second, doc_ids=doc_ids[:, 20:], chunk_size=16, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, final, rtol=1e-5, atol=1e-5)


def test_dispatch_picks_and_forces_backends():
    inputs = make_inputs(1, 9, 2, 4, 1, 4, torch.float32, seed=2)
    default = "triton" if DEVICE == "cuda" and HAS_TRITON else "chunked"
    y = ssd(**inputs, chunk_size=4)
    torch.testing.assert_close(y, IMPLEMENTATIONS[default](**inputs, chunk_size=4))
    torch.testing.assert_close(ssd(**inputs, backend="reference"), y, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown"):
        ssd(**inputs, backend="cuda-magic")


def test_bad_shapes_name_the_argument():
    inputs = make_inputs(1, 9, 4, 4, 2, 4, torch.float32, seed=2)
    with pytest.raises(ValueError, match="initial_state"):
        ssd(**{**inputs, "initial_state": torch.randn(1, 4, 4, 5)}, backend="chunked")
    with pytest.raises(ValueError, match="D must be"):
        ssd(**{**inputs, "D": torch.randn(3)}, backend="chunked")
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd(**{**inputs, "B": torch.randn(1, 9, 3, 4), "C": torch.randn(1, 9, 3, 4)}, backend="chunked")


@pytest.mark.parametrize("backend", ["chunked"] + (["triton"] if HAS_TRITON else []))
def test_chunk_not_power_of_two_and_output_only_loss(backend):
    """chunk_size 12 (tiles are masked to it) and a loss on y alone (no final-state gradient)."""
    inputs = make_inputs(1, 30, 2, 8, 1, 6, torch.float32, seed=41)
    doc_ids = doc_ids_for("edges", 1, 30, 12)
    grads = []
    for fn, kwargs in ((IMPLEMENTATIONS[backend], {"chunk_size": 12}), (ssd_reference, {})):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y = fn(**leaves, doc_ids=doc_ids, **kwargs)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        grads.append([y] + [leaves[k].grad for k in sorted(leaves)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["chunked"] + (["triton"] if HAS_TRITON else []))
def test_strided_views_as_a_mamba2_layer_passes_them(backend):
    """x, B, C sliced out of one projection (non-contiguous), T a multiple of the chunk."""
    gen = torch.Generator().manual_seed(43)
    xbc = torch.randn(2, 32, 4 * 8 + 2 * 2 * 6, generator=gen).to(DEVICE)
    x, B, C = xbc[..., :32].unflatten(-1, (4, 8)), xbc[..., 32:44].unflatten(-1, (2, 6)), xbc[..., 44:].unflatten(-1, (2, 6))
    dt, A = torch.randn(2, 32, 4, generator=gen).to(DEVICE), -torch.rand(4, generator=gen).to(DEVICE) - 0.5
    y = IMPLEMENTATIONS[backend](x, dt, A, B, C, chunk_size=16)
    torch.testing.assert_close(y, ssd_reference(x, dt, A, B, C), rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("env,value", [("UNDERTOW_SSD_BWD", "fast"), ("UNDERTOW_SSD_DOT", "fp8"),
                                       ("UNDERTOW_SSD_TILES", "m=48"), ("UNDERTOW_SSD_TILES", "blocks=2")])
def test_triton_bad_knobs_are_refused(monkeypatch, env, value):
    """A mistyped knob fails with its name and value, not silently with the default (16-bit inputs:
    float32 ones never read the dot knob)."""
    monkeypatch.setenv(env, value)
    inputs = make_inputs(1, 9, 2, 8, 1, 4, torch.float16, seed=5)
    with pytest.raises(ValueError, match=env):
        leaves = {k: v.requires_grad_() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
        ssd(**leaves, chunk_size=8, backend="triton").float().sum().backward()
