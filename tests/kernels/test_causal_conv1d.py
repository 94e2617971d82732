"""causal_conv1d: chunked and Triton (interpreter on CPU) against the reference loop."""

import pytest
import torch

from undertow.kernels.causal_conv1d import IMPLEMENTATIONS, causal_conv1d
from undertow.kernels.causal_conv1d.reference import causal_conv1d_reference

# Compiled Triton on a GPU; else the interpreter on CPU (tests/kernels/conftest.py sets it up).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_runnable(implementations: dict, kernel_module: str) -> bool:
    """Whether the op's Triton form can run here: on CUDA, or interpreted on CPU. The interpreter
    applies only to kernels imported after TRITON_INTERPRET=1 was set."""
    if "triton" not in implementations:
        return False
    if DEVICE == "cuda":
        return True
    import importlib

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(kernel_module)
    return not any(isinstance(v, JITFunction) for v in vars(module).values()) and any(
        isinstance(v, InterpretedFunction) for v in vars(module).values()
    )


BACKENDS = ["chunked"] + (["triton"] if triton_runnable(IMPLEMENTATIONS, "undertow.kernels.causal_conv1d.triton") else [])
TOL = {("chunked", torch.float32): 1e-5, ("triton", torch.float32): 1e-4, ("triton", torch.float16): 1e-2}


def make_doc_ids(B: int, T: int, seed: int, continue_at: int = 0) -> torch.Tensor:
    """(B, T) document ids with boundaries inside the rows (one right after t = 0 when T > 2),
    none at `continue_at` (a row split there continues its document, as the spec's t = 0 does)."""
    gen = torch.Generator().manual_seed(seed)
    new_doc = torch.rand(B, T, generator=gen) < 0.2
    if T > 2:
        new_doc[0, 1] = True
    new_doc[:, 0] = False
    new_doc[:, continue_at] = False
    return new_doc.cumsum(1).to(DEVICE)


def make_inputs(B, T, D, K, dtype, *, with_bias=True, with_init=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    return {
        "x": rnd(B, T, D),
        "weight": rnd(D, K),
        "bias": rnd(D) if with_bias else None,
        "initial_state": rnd(B, D, K - 1) if with_init else None,
    }


FULL_GRID = [
    (K, T, docs, init) for K, T in [(2, 1), (3, 7), (4, 33), (2, 100), (4, 100)] for docs in (False, True)
    for init in (False, True)
]
# The interpreter runs Triton slowly on CPU: a subset that still covers every K, T and flag.
TRITON_GRID = [(2, 1, False, True), (3, 7, True, False), (4, 33, True, True), (4, 33, False, False),
               (2, 100, True, True), (4, 100, True, False)]
CASES = [("chunked", *case) for case in FULL_GRID] + [("triton", *case) for case in TRITON_GRID if "triton" in BACKENDS]


@pytest.mark.parametrize("backend,K,T,with_docs,with_init", CASES)
def test_matches_reference_fp32(compare_with_reference, backend, K, T, with_docs, with_init):
    B, D = 2, 5
    inputs = make_inputs(B, T, D, K, torch.float32, with_init=with_init, seed=T * 10 + K)
    inputs["doc_ids"] = make_doc_ids(B, T, seed=T) if with_docs else None
    compare_with_reference(
        IMPLEMENTATIONS[backend], causal_conv1d_reference, inputs, {"activation": "silu"}, TOL[(backend, torch.float32)]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_activation_no_bias(compare_with_reference, backend):
    inputs = make_inputs(2, 19, 3, 3, torch.float32, with_bias=False, seed=3)
    inputs["doc_ids"] = make_doc_ids(2, 19, seed=4)
    compare_with_reference(
        IMPLEMENTATIONS[backend], causal_conv1d_reference, inputs, {"activation": None}, TOL[(backend, torch.float32)]
    )


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
@pytest.mark.parametrize("dtype,K,T", [(torch.float16, 2, 9), (torch.float16, 4, 70), (torch.bfloat16, 3, 11)])
def test_triton_low_precision(compare_with_reference, dtype, K, T):
    inputs = make_inputs(2, T, 6, K, dtype, seed=K)
    inputs["doc_ids"] = make_doc_ids(2, T, seed=K)
    compare_with_reference(IMPLEMENTATIONS["triton"], causal_conv1d_reference, inputs, {}, 1e-2, reference_in_float32=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 13])
def test_split_sequence_carries_state(backend, split):
    """Running [0, split) then [split, T) with final_state -> initial_state equals one pass."""
    fn = IMPLEMENTATIONS[backend]
    inputs = make_inputs(2, 30, 4, 4, torch.float32, seed=split)
    doc_ids = make_doc_ids(2, 30, seed=split, continue_at=split)
    whole, final = fn(**inputs, doc_ids=doc_ids, return_final_state=True)
    x, w, b, h0 = inputs["x"], inputs["weight"], inputs["bias"], inputs["initial_state"]
    y1, mid = fn(x[:, :split], w, b, initial_state=h0, doc_ids=doc_ids[:, :split], return_final_state=True)
    y2, end = fn(x[:, split:], w, b, initial_state=mid, doc_ids=doc_ids[:, split:], return_final_state=True)
    assert torch.allclose(torch.cat([y1, y2], 1), whole, rtol=1e-5, atol=1e-5)
    assert torch.allclose(end, final, rtol=1e-5, atol=1e-5)


def test_dispatch_forced_and_unknown(monkeypatch):
    inputs = make_inputs(1, 5, 2, 3, torch.float32)
    ref = causal_conv1d(**inputs, backend="reference")
    for backend in BACKENDS:
        assert torch.allclose(causal_conv1d(**inputs, backend=backend), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        causal_conv1d(**inputs, backend="cuda-magic")
    monkeypatch.setenv("UNDERTOW_KERNEL_BACKEND", "chunked")
    assert torch.allclose(causal_conv1d(**inputs), ref, rtol=1e-5, atol=1e-6)


def test_bad_initial_state_shape_raises():
    inputs = make_inputs(1, 5, 2, 3, torch.float32)
    inputs["initial_state"] = torch.randn(1, 2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(**inputs, backend="chunked")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
def test_triton_kernel_size_outside_2_to_4_raises():
    with pytest.raises(ValueError, match="2 <= K <= 4"):
        causal_conv1d(**make_inputs(1, 5, 2, 5, torch.float32), backend="triton")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
def test_triton_shorter_than_window(compare_with_reference):
    """T < K-1: the final window still holds carried-in inputs."""
    inputs = make_inputs(2, 2, 3, 4, torch.float32, seed=7)
    inputs["doc_ids"] = torch.tensor([[0, 0], [0, 1]], device=DEVICE)
    compare_with_reference(IMPLEMENTATIONS["triton"], causal_conv1d_reference, inputs, {}, 1e-4)


def test_chunked_bf16(compare_with_reference):
    inputs = make_inputs(2, 40, 6, 4, torch.bfloat16, seed=8)
    inputs["doc_ids"] = make_doc_ids(2, 40, seed=8)
    compare_with_reference(IMPLEMENTATIONS["chunked"], causal_conv1d_reference, inputs, {}, 1e-2, reference_in_float32=True)
