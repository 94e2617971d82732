"""Shared by the kernel tests: Triton's interpreter on CPU, and the check against the reference."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of a Triton kernel module; lets triton.py run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or inf."""
    if not torch.isfinite(out).all():
        return float("inf")
    ref64 = ref.double()
    return ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def _run(fn, inputs: dict, kwargs: dict, cotangents: dict | None):
    """Calls fn(**inputs, **kwargs, return_final_state=True) on fresh leaves; returns
    (output, final_state, {name: grad}) after backpropagating the given cotangents."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) if v is not None else None
              for k, v in inputs.items()}
    y, final = fn(**leaves, **kwargs, return_final_state=True)
    if cotangents is None:  # drawn on the CPU from a fixed seed: the same values on every run and device
        gen = torch.Generator().manual_seed(0)
        cotangents = {"y": torch.randn(y.shape, generator=gen).to(y.device),
                      "final": torch.randn(final.shape, generator=gen).to(final.device, final.dtype)}
    loss = (y.float() * cotangents["y"]).sum() + (final.float() * cotangents["final"]).sum()
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None and v.is_floating_point()}
    return y, final, grads, cotangents


@pytest.fixture
def compare_with_reference():
    """compare(fn, reference, inputs, kwargs, tol): outputs, final states and the gradient of every
    floating input of `fn` must match `reference` to ||out - ref|| / ||ref|| <= tol.

    With reference_in_float32, the reference runs on float32 copies of the (bf16/fp16) inputs:
    the exact answer for those values, free of the reference's own low-precision rounding (its
    per-step casts accumulate bf16 gradients)."""

    def compare(fn, reference, inputs: dict, kwargs: dict, tol: float, reference_in_float32: bool = False):
        ref_inputs = inputs
        if reference_in_float32:
            ref_inputs = {k: v.float() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
        y_ref, f_ref, g_ref, cot = _run(reference, ref_inputs, kwargs, None)
        y, f, g, _ = _run(fn, inputs, kwargs, cot)
        assert f.dtype == f_ref.dtype and (reference_in_float32 or y.dtype == y_ref.dtype)
        errors = {"y": relative_error(y, y_ref), "final_state": relative_error(f, f_ref)}
        for name, grad in g_ref.items():
            assert g[name] is not None, f"no gradient for {name}"
            errors[f"grad {name}"] = relative_error(g[name], grad)
        bad = {k: e for k, e in errors.items() if not e <= tol}
        assert not bad, f"relative errors above {tol:g}: {bad}"

    return compare
