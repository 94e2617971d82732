"""The Triton grouped GEMM of the MoE experts (kernels/moe/triton_grouped.py) against one matmul per
group computed in float64: the output and the gradients of xs and w within 1e-5 in float32, under
uneven groups, empty ones (first, middle, last), a group smaller than a row tile and groups over several
row tiles, K and N not multiples of their tiles (several K steps and N tiles at the small blocks); w
given as a transposed view; and moe_experts with gemm="triton" forced against the loop over experts.
The dispatch: CUDA without a working torch._grouped_mm picks triton, CPU keeps split, a forced triton
that cannot run raises. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1,
tests/kernels/conftest.py) at tiny shapes."""

from unittest import mock

import pytest
import torch

from tests.kernels.conftest import relative_error
from tests.kernels.test_causal_conv1d import DEVICE, triton_runnable
from tests.kernels.test_moe import CASES, make_inputs, run
from undertow.kernels.moe import grouped
from undertow.kernels.moe.grouped import GEMMS, choose_gemm

TRITON = triton_runnable(dict.fromkeys(GEMMS), "undertow.kernels.moe.triton_grouped_kernels")
pytestmark = pytest.mark.skipif(not TRITON, reason="the Triton form runs on CUDA or in the interpreter "
                                                   "(TRITON_INTERPRET=1)")
TOL = 1e-5
SMALL = dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=1)  # several row tiles, N tiles and K steps

GROUPS = {
    "uneven": [5, 0, 70, 3, 0, 17],  # a group under one tile, one over several, empty ones between
    "empty-ends": [0, 33, 1, 0],
    "one-group": [0, 0, 41],
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["default", "small"])
def blocks(request, monkeypatch):
    """The kernels' float32 tiles: as shipped, or 16 wide everywhere."""
    from undertow.kernels.moe import triton_grouped

    if request.param == "small":
        monkeypatch.setitem(triton_grouped.ROWS_MM, 4, SMALL)
        monkeypatch.setitem(triton_grouped.WEIGHT_MM, 4, SMALL)
    return request.param


def grouped_product(fn, xs, w, counts, cotangent, transpose_w=False):
    """fn(xs, w (E, K, N), offsets) on fresh leaves -> output and the gradients of xs and w."""
    xs, w = (t.detach().clone().requires_grad_() for t in (xs, w))
    weight = w.transpose(1, 2).contiguous().transpose(1, 2) if transpose_w else w  # same values, (E, N, K) memory
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).to(xs.device)
    y = fn(xs, weight, offsets)
    (y * cotangent.to(y.dtype)).sum().backward()
    return y, xs.grad, w.grad


def split64(xs, w, offsets):
    """The spec: one matmul per group in float64."""
    counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long()).tolist()
    return grouped._gemm_split(xs.double(), w.double(), offsets, counts)


def triton_on_device(xs, w, offsets):
    from undertow.kernels.moe.triton_grouped import grouped_mm_triton

    return grouped_mm_triton(xs.to(DEVICE), w.to(DEVICE), offsets.to(DEVICE)).cpu()


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("groups", sorted(GROUPS))
def test_grouped_gemm_matches_per_group_matmuls(groups, transpose_w, blocks):
    counts = GROUPS[groups]
    M, K, N, E = sum(counts), 40, 24 if blocks == "default" else 40, len(counts)
    gen = torch.Generator().manual_seed(len(counts) + M)
    xs, w, cot = torch.randn(M, K, generator=gen), torch.randn(E, K, N, generator=gen), torch.randn(M, N, generator=gen)
    ref = grouped_product(split64, xs, w, counts, cot)
    out = grouped_product(triton_on_device, xs, w, counts, cot, transpose_w)
    assert out[0].dtype == torch.float32
    errors = {name: relative_error(o, r) for name, o, r in zip(("y", "grad xs", "grad w"), out, ref)}
    assert all(e <= TOL for e in errors.values()), errors
    for e, count in enumerate(counts):  # an expert without rows gets exactly zero
        if count == 0:
            assert torch.count_nonzero(out[2][e]) == 0


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
def test_half_inputs_within_1e_2(dtype):
    """Half operands, float32 accumulation, outputs and gradients in the inputs' dtype; against float64 on
    the same values. bf16 on a GPU only: the interpreter's bf16 tl.dot is wrong."""
    counts = GROUPS["uneven"]
    gen = torch.Generator().manual_seed(3)
    xs, w = torch.randn(sum(counts), 40, generator=gen).to(dtype), torch.randn(6, 40, 24, generator=gen).to(dtype)
    cot = torch.randn(sum(counts), 24, generator=gen)
    ref = grouped_product(split64, xs, w, counts, cot)
    out = grouped_product(triton_on_device, xs, w, counts, cot)
    assert all(o.dtype == dtype for o in out)
    errors = {name: relative_error(o, r) for name, o, r in zip(("y", "grad xs", "grad w"), out, ref)}
    assert all(e <= 1e-2 for e in errors.values()), errors


def test_broadcast_gradient():
    """y.sum()'s gradient is an expanded (stride 0) tensor: read through its strides, no copy needed."""
    counts = GROUPS["empty-ends"]
    gen = torch.Generator().manual_seed(5)
    xs, w = torch.randn(sum(counts), 24, generator=gen), torch.randn(len(counts), 24, 20, generator=gen)
    ones = torch.ones(sum(counts), 20)
    ref = grouped_product(split64, xs, w, counts, ones)
    leaves = [t.clone().requires_grad_() for t in (xs, w)]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    triton_on_device(*leaves, offsets).sum().backward()
    assert relative_error(leaves[0].grad, ref[1]) <= TOL and relative_error(leaves[1].grad, ref[2]) <= TOL


def test_tile_map_covers_each_row_once_inside_its_group():
    from undertow.kernels.moe.triton_grouped import tile_map

    counts = GROUPS["uneven"]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    group, row = tile_map(offsets, sum(counts), 16)
    covered = []
    for g, r in zip(group.tolist(), row.tolist()):
        if g >= 0:
            end = offsets[g].item()
            start = end - counts[g]
            assert start <= r < end  # a tile starts inside its group and is clipped at the group's end
            covered += range(r, min(r + 16, end))
    assert sorted(covered) == list(range(sum(counts)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_experts_with_triton_gemm_matches_reference(case):
    inputs = make_inputs(**CASES[case])
    ref, ref_grads = run(inputs, backend="reference")
    out, grads = run(inputs, backend="chunked", gemm="triton")
    assert relative_error(out, ref) <= TOL
    for i, g in ref_grads.items():
        assert relative_error(grads[i], g) <= TOL, f"gradient of input {i}"


def test_dispatch_picks_triton_on_cuda_without_grouped_mm(monkeypatch):
    cuda_x = mock.Mock(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda"))
    cuda_x.element_size.return_value = 2
    w = torch.empty(4, 64, 32)
    monkeypatch.setattr(grouped, "triton_runs_on", lambda x: True)
    monkeypatch.setattr(grouped, "grouped_mm_runs", lambda device, dtype: False)
    assert choose_gemm(cuda_x, w, w) == "triton"
    monkeypatch.setattr(grouped, "grouped_mm_runs", lambda device, dtype: True)
    assert choose_gemm(cuda_x, w, w) == "grouped_mm"
    monkeypatch.setattr(grouped, "grouped_mm_runs", lambda device, dtype: False)
    assert choose_gemm(torch.empty(3, 64), w, w) == "split"  # CPU keeps split, the interpreter notwithstanding


def test_forced_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(grouped, "triton_runs_on", lambda x: False)
    with pytest.raises(RuntimeError, match="'triton' was forced"):
        run(make_inputs(**CASES["top1"]), backend="chunked", gemm="triton")
