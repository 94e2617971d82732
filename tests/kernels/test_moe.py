"""moe_experts: the grouped form (torch._grouped_mm and the split GEMM) against the loop over
experts: outputs and the gradients of the tokens, the experts' weights and the routing weights,
under uneven loads and with experts that get no tokens."""

import pytest
import torch

from tests.kernels.conftest import relative_error
from undertow.kernels.moe import grouped_mm_runs, moe_experts
from undertow.kernels.moe.grouped import choose_gemm, sort_by_expert

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMMS = ["split"] + (["grouped_mm"] if grouped_mm_runs(DEVICE, torch.float32) else [])


def make_inputs(N, d, h, E, k, seed=0, skew=0.0, empty=()):
    """Tokens, top-k expert ids (distinct per token), routing weights and expert weights. `skew`
    tilts the choice towards low expert ids (uneven loads); experts in `empty` are never chosen."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(N, E, generator=gen) - skew * torch.arange(E, dtype=torch.float32)
    scores[:, list(empty)] = -torch.inf
    idx = scores.topk(k, dim=-1).indices
    weights = torch.softmax(torch.randn(N, k, generator=gen), -1)
    x = torch.randn(N, d, generator=gen)
    w_gate, w_up = (torch.randn(E, d, h, generator=gen) / d**0.5 for _ in range(2))
    w_down = torch.randn(E, h, d, generator=gen) / h**0.5
    return [t.to(DEVICE) for t in (x, idx, weights, w_gate, w_up, w_down)]


def run(inputs, **kwargs):
    """Output and the gradients of x, weights, w_gate, w_up, w_down for a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = moe_experts(*leaves, **kwargs)
    gen = torch.Generator().manual_seed(1)
    (out * torch.randn(out.shape, generator=gen).to(out.device)).sum().backward()
    return out, {i: t.grad for i, t in enumerate(leaves) if t.is_floating_point()}


CASES = {
    "balanced": dict(N=37, d=16, h=24, E=4, k=2),
    "uneven": dict(N=64, d=16, h=8, E=6, k=2, skew=1.5),
    "empty-experts": dict(N=29, d=16, h=16, E=5, k=2, empty=(0, 3)),
    "top1": dict(N=20, d=8, h=12, E=3, k=1),
}


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_matches_reference(case, gemm):
    inputs = make_inputs(**CASES[case])
    ref, ref_grads = run(inputs, backend="reference")
    if gemm == "grouped_mm" and choose_gemm(inputs[0], inputs[3], inputs[5]) != "grouped_mm":
        pytest.skip("shapes not 16-byte aligned for torch._grouped_mm")
    out, grads = run(inputs, backend="chunked", gemm=gemm)
    assert relative_error(out, ref) <= 1e-5
    for i, g in ref_grads.items():
        assert relative_error(grads[i], g) <= 1e-5, f"gradient of input {i}"
    if "empty" in CASES[case]:  # experts without tokens get exactly zero gradients
        for e in CASES[case]["empty"]:
            assert torch.count_nonzero(grads[3][e]) == 0 and torch.count_nonzero(grads[5][e]) == 0


def test_sort_by_expert_counts_every_pair():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])
    order, counts = sort_by_expert(idx, 4)
    assert counts.tolist() == [2, 1, 3, 0]
    assert idx.reshape(-1)[order].tolist() == [0, 0, 1, 2, 2, 2]


def test_unknown_gemm_refused():
    with pytest.raises(ValueError, match="grouped gemm 'cutlass'"):
        moe_experts(*make_inputs(N=4, d=8, h=8, E=2, k=1), backend="chunked", gemm="cutlass")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_bfloat16_autocast_within_tolerance(backend):
    """Under bf16 autocast (the trainer's GPU setting) the experts compute in bf16 and the output keeps
    x's dtype: within 1e-2 of the float32 reference."""
    inputs = make_inputs(N=40, d=16, h=16, E=4, k=2)
    ref = moe_experts(*inputs, backend="reference")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = moe_experts(*inputs, backend=backend)
    assert out.dtype == torch.float32 and relative_error(out, ref) <= 1e-2
