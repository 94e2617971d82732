"""rmsnorm (plain and gated/grouped): chunked and Triton (interpreter on CPU, compiled on CUDA) against
the reference, outputs and every gradient; the modules' autograd graphs keep no float32 copies."""

import pytest
import torch

from tests.kernels.conftest import relative_error
from undertow.kernels.rmsnorm import IMPLEMENTATIONS, rmsnorm
from undertow.kernels.rmsnorm.reference import rmsnorm_reference
from undertow.models.common.gated_norm import GatedRMSNorm
from undertow.models.common.norms import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["chunked"] + (["triton"] if "triton" in IMPLEMENTATIONS else [])
LOW = [torch.float16, torch.bfloat16]  # no tl.dot here, so the interpreter's bf16 is right too
TOL = {("chunked", torch.float32): 1e-5, ("triton", torch.float32): 1e-4}


def tolerance(backend: str, dtype: torch.dtype) -> float:
    return TOL.get((backend, dtype), 1e-2)


def run(fn, inputs: dict, kwargs: dict, cotangent: torch.Tensor):
    """out and {name: grad} of fn(**inputs, **kwargs) on fresh leaves, backpropagating `cotangent`."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    (out.float() * cotangent).sum().backward()
    return out, {k: v.grad for k, v in leaves.items() if v is not None}


def check(backend, shape, groups, gated, dtype, out_dtype=None, seed=0):
    """Backend vs the reference on float32 copies of the same inputs (the exact answer for them)."""
    gen = torch.Generator().manual_seed(seed)
    dim = shape[-1]
    inputs = {
        "x": (torch.randn(*shape, generator=gen) * 2 + 0.3).to(dtype).to(DEVICE),
        "weight": (1 + 0.5 * torch.randn(dim, generator=gen)).to(DEVICE),
        "z": torch.randn(*shape, generator=gen).to(dtype).to(DEVICE) if gated else None,
    }
    kwargs = {"group_size": dim // groups, "eps": 1e-5}
    out_dtype = out_dtype or dtype
    cot = torch.randn(*shape, generator=gen).to(DEVICE)
    ref_inputs = {k: v.float() if v is not None else None for k, v in inputs.items()}
    ref, ref_grads = run(rmsnorm_reference, ref_inputs, {**kwargs, "out_dtype": torch.float32}, cot)
    out, grads = run(IMPLEMENTATIONS[backend], inputs, {**kwargs, "out_dtype": out_dtype}, cot)
    assert out.dtype == out_dtype and out.shape == ref.shape
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
    errors = {"out": relative_error(out, ref), **{f"grad {k}": relative_error(g, ref_grads[k]) for k, g in grads.items()}}
    tol = tolerance(backend, dtype if dtype == out_dtype else torch.float16)
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


CASES = [  # (shape, groups, gated): odd dims, dims not a power of two, 1/2/8 groups
    ((4, 37), 1, False),
    ((2, 3, 1000), 1, True),
    ((2, 3, 1000), 8, True),
    ((5, 2048 + 256), 2, False),
    ((5, 2048 + 256), 8, True),
    ((3, 2048), 1, True),
    ((1, 9, 24), 2, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups,gated", CASES)
def test_matches_reference_fp32(backend, shape, groups, gated):
    check(backend, shape, groups, gated, torch.float32, seed=sum(shape) + groups)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape,groups,gated", [CASES[1], CASES[4], CASES[6]])
def test_matches_reference_low_precision(backend, dtype, shape, groups, gated):
    check(backend, shape, groups, gated, dtype, seed=7 * groups)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", LOW, ids=str)
def test_float32_residual_in_half_out(backend, out_dtype):
    """A block's norm: float32 residual in, the mixer's half-precision input out."""
    check(backend, (2, 5, 96), 1, False, torch.float32, out_dtype=out_dtype, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_gate_as_a_mamba2_layer_passes_it(backend):
    """z sliced out of one projection output (row stride > dim), y from a flattened head view."""
    gen = torch.Generator().manual_seed(5)
    proj = torch.randn(2, 6, 3 * 40, generator=gen).to(DEVICE)
    z, y = proj[..., :40], proj[..., 40:80]
    w = (1 + torch.rand(40, generator=gen)).to(DEVICE)
    out = IMPLEMENTATIONS[backend](y, w, z=z, group_size=20)
    torch.testing.assert_close(out, rmsnorm_reference(y, w, z=z, group_size=20), rtol=1e-4, atol=1e-4)


def saved_bytes(fn) -> tuple[int, list]:
    """Bytes of every tensor autograd saves while fn() runs, and their (dtype, numel)."""
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(b for *_, b in saved), saved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gated_module_saves_no_float32_copies(backend, dtype, monkeypatch):
    """GatedRMSNorm on half-precision y, z keeps y, z, the weight and 1/rms per group; nothing more."""
    monkeypatch.setenv("UNDERTOW_KERNEL_BACKEND", backend)
    rows, dim, groups = 64, 96, 4
    norm = GatedRMSNorm(dim, dim // groups).to(DEVICE)
    y = torch.randn(rows, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    z = torch.randn(rows, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    total, saved = saved_bytes(lambda: norm(y, z))
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= rows * dim], saved
    assert total <= 2 * rows * dim * y.element_size() + dim * 4 + rows * groups * 4, saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_norm_saves_only_its_input(backend, monkeypatch):
    """RMSNorm on the float32 residual with a half-precision output keeps x, the weight and 1/rms per row."""
    monkeypatch.setenv("UNDERTOW_KERNEL_BACKEND", backend)
    rows, dim = 64, 96
    norm = RMSNorm(dim).to(DEVICE)
    x = torch.randn(rows, dim, device=DEVICE, requires_grad=True)
    total, saved = saved_bytes(lambda: norm(x, out_dtype=torch.float16))
    assert total <= rows * dim * 4 + dim * 4 + rows * 4, saved


def test_modules_match_the_reference_formula():
    """The modules keep their results: float32 math, output in the input's dtype (or out_dtype)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 7, 48, generator=gen).to(DEVICE)
    z = torch.randn(3, 7, 48, generator=gen).to(DEVICE)
    norm, gated = RMSNorm(48).to(DEVICE), GatedRMSNorm(48, 12).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        gated.weight.uniform_(0.5, 1.5)
    torch.testing.assert_close(norm(x), rmsnorm_reference(x, norm.weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated(x, z), rmsnorm_reference(x, gated.weight, z=z, group_size=12), rtol=1e-5, atol=1e-5)
    assert norm(x.half()).dtype == torch.float16 and norm(x, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert gated(x.half(), z.half()).dtype == torch.float16


def test_dispatch_forces_backends_and_checks_shapes():
    x, w = torch.randn(4, 12, device=DEVICE), torch.rand(12, device=DEVICE) + 0.5
    torch.testing.assert_close(rmsnorm(x, w, backend="reference"), rmsnorm(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        rmsnorm(x, w, group_size=5)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, w[:6])
    with pytest.raises(ValueError, match="z must"):
        rmsnorm(x, w, z=x[:2])
    with pytest.raises(ValueError, match="unknown"):
        rmsnorm(x, w, backend="cuda-magic")
