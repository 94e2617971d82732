"""The dropless mixture-of-experts computation as grouped GEMMs over tokens sorted by expert.

    sort:    the N*k (token, slot) pairs ordered by expert (stable), counts per expert (E,)
    gather:  xs = x[token of each pair]                                   (N*k, d)
    experts: three grouped GEMMs, each group a contiguous run of rows with its expert's weights
    combine: out[token] += weight * ys                                    (N, d)

The grouped GEMM is `torch._grouped_mm` where this build has it and it runs (forward and backward,
checked once per device and dtype by running it: `grouped_mm_runs`), else on CUDA the Triton grouped
GEMM (`triton`, triton_grouped.py), else one matmul per group on views of the sorted rows (`split`).
All are autograd-differentiable; experts with zero tokens are empty groups.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import triton_runs_on
from undertow.log import get_logger

GEMMS = ("grouped_mm", "split", "triton")
_logged: set[tuple[str, str, torch.dtype]] = set()


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """idx (N, k) -> routed pairs per expert (E,) int64 (an index_add: bincount has no meta kernel,
    and the planner profiles models on the meta device)."""
    flat = idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=idx.device).index_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (N, k) -> order (N*k,) flat pair indices sorted by expert (stable), counts (E,) int64."""
    order = torch.argsort(idx.reshape(-1), stable=True)
    return order, expert_counts(idx, n_experts)


def group_sizes(counts: torch.Tensor, pairs: int) -> list[int]:
    """counts as Python ints (one host sync); on the meta device, where there are no values, an
    even split of the pairs stands in (the planner's memory profile)."""
    if counts.device.type != "meta":
        return counts.tolist()
    E = counts.shape[0]
    return [pairs // E + (1 if e < pairs % E else 0) for e in range(E)]


def _contiguous_grad(y: torch.Tensor) -> torch.Tensor:
    """y unchanged; its gradient made contiguous before it reaches _grouped_mm's backward (which
    rejects broadcast gradients such as those of a .sum())."""
    if y.requires_grad:
        y.register_hook(lambda g: g.contiguous())
    return y


def _gemm_grouped_mm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return _contiguous_grad(torch._grouped_mm(xs, w, offs=offsets))


def _gemm_split(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: list[int]) -> torch.Tensor:
    parts = xs.split(counts)
    return torch.cat([part @ w[e] for e, part in enumerate(parts)])


def _gemm_triton(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: list[int]) -> torch.Tensor:
    from undertow.kernels.moe.triton_grouped import grouped_mm_triton  # imports triton on first use

    return grouped_mm_triton(xs, w, offsets)


_GEMM_FNS = {"grouped_mm": _gemm_grouped_mm, "split": _gemm_split, "triton": _gemm_triton}


@functools.cache
def grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm computes a 2-group product (one group empty) and its gradients
    correctly on this device and dtype: the behaviour decides, not the name."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The probe runs its own forward and backward wherever the first MoE forward happens: with grad on
    # (a first call in eval would otherwise fail and cache False), without autocast, and with its
    # saved tensors kept from any enclosing hooks (activation checkpointing would count them, and
    # its recompute, which finds the answer cached, would not).
    no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                   else contextlib.nullcontext())
    with torch.enable_grad(), no_autocast, torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return _probe_grouped_mm(device_type, dtype)


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(24, 16, generator=gen).to(device_type, dtype).requires_grad_()
        w = torch.randn(3, 16, 16, generator=gen).to(device_type, dtype).requires_grad_()
        offsets = torch.tensor([8, 8, 24], dtype=torch.int32, device=device_type)
        y = _gemm_grouped_mm(x, w, offsets, [8, 0, 16])
        y.sum().backward()
        ref = torch.cat([x[:8] @ w[0], x[8:] @ w[2]])
        tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        ok = torch.allclose(y, ref, rtol=tol, atol=tol) and x.grad is not None and w.grad is not None
        ok = ok and bool(torch.allclose(w.grad[1].float(), torch.zeros(16, 16, device=device_type)))
        return bool(ok)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def choose_gemm(x: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor) -> str:
    """grouped_mm where it runs on x's device and dtype and the rows are 16-byte aligned (its
    requirement), else triton on CUDA (where Triton is installed), else split."""
    aligned = all((size * x.element_size()) % 16 == 0 for size in (w_gate.shape[1], w_gate.shape[2]))
    if aligned and grouped_mm_runs(x.device.type, x.dtype):
        return "grouped_mm"
    return "triton" if x.is_cuda and triton_runs_on(x) else "split"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype where it is on for x's device (torch._grouped_mm is not an autocast op: the
    cast is explicit), else x's."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def moe_grouped(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, gemm: str | None = None) -> torch.Tensor:
    """Same contract as reference.moe_reference (x (N, d), idx/weights (N, k), w_gate/w_up (E, d, h),
    w_down (E, h, d) -> (N, d)); `gemm` in GEMMS forces the grouped GEMM (None: choose_gemm)."""
    dtype = compute_dtype(x)
    if dtype != x.dtype or w_gate.dtype != dtype:  # autocast's dtype, as its matmuls would compute in
        out = moe_grouped(x.to(dtype), idx, weights, w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype), gemm)
        return out.to(x.dtype)
    gemm = gemm or choose_gemm(x, w_gate, w_down)
    if gemm not in _GEMM_FNS:
        raise ValueError(f"moe grouped gemm {gemm!r} is unknown; choose one of {GEMMS}")
    if gemm == "triton" and not triton_runs_on(x):
        raise RuntimeError(f"moe grouped gemm 'triton' was forced but cannot run on {x.device} tensors (needs "
                           "CUDA, or TRITON_INTERPRET=1 set before the kernel module is imported, and triton)")
    if (gemm, x.device.type, x.dtype) not in _logged:  # once per choice, never silent
        _logged.add((gemm, x.device.type, x.dtype))
        get_logger("undertow.kernels").info("moe grouped gemm: %s (%s, %s)", gemm, x.device.type, x.dtype)
    N, k = idx.shape
    order, counts = sort_by_expert(idx, w_gate.shape[0])
    token = order // k
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    sizes = group_sizes(counts, N * k) if gemm == "split" else []
    matmul = functools.partial(_GEMM_FNS[gemm], offsets=offsets, counts=sizes)
    xs = x[token]
    h = F.silu(matmul(xs, w_gate)) * matmul(xs, w_up)
    ys = matmul(h, w_down)
    pair_weight = weights.reshape(-1)[order]
    # the k experts' outputs of a token summed in (at least) float32, then x's dtype
    acc = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    return acc.index_add(0, token, (ys * pair_weight[:, None].to(ys.dtype)).to(acc.dtype)).to(x.dtype)
