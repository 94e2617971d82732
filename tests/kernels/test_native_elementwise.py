"""The one-pass native CPU loops of the elementwise ops (kernels/native.py `elementwise_parts`):
SwiGLU's activation, RMSNorm (plain, gated, grouped), xLSTM's gated per-head norm. Each against its
PyTorch reference (value and every gradient, DESIGN.md's float32 tolerance) on one torch thread and
on two (in pieces over torch's OpenMP threads where the library shares torch's runtime, else not
native at all), with a check that the native loop really ran where it applies, that NaN passes
through, and that float64 steps aside. The head loss's loop is tested with the fused loss
(tests/models/test_fused_loss.py)."""

import pytest
import torch

from undertow.kernels import native
from undertow.kernels.multihead_norm import chunked as mh_chunked
from undertow.kernels.multihead_norm import multihead_norm
from undertow.kernels.multihead_norm.reference import multihead_norm_reference
from undertow.kernels.rmsnorm import native as rms_native
from undertow.kernels.rmsnorm import rmsnorm
from undertow.kernels.rmsnorm.reference import rmsnorm_reference
from undertow.kernels.swiglu import chunked as sw_chunked
from undertow.kernels.swiglu import swiglu
from undertow.kernels.swiglu.reference import swiglu_reference


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def one_thread(request):
    """One or two torch threads; yields whether the native loops must run (always on one thread; on
    two where the library shares torch's OpenMP runtime). Skipped only where no compiler could build
    them."""
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler: the native loops cannot be built here")
    threads = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param == 1 or native.torch_openmp() is not None
    torch.set_num_threads(threads)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def counting(monkeypatch, module, name, calls=None):
    """Record in `calls` whether each call of module.name (a native entry point) returned something."""
    calls = [] if calls is None else calls
    real = getattr(module, name)

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, name, counted)
    return calls


def compare(fn, ref, inputs, grad_out):
    """fn(*inputs) against ref(*inputs): the value and the gradient of every input."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    twins = [x.detach().clone().requires_grad_() for x in inputs]
    out, expected = fn(*leaves), ref(*twins)
    assert rel(out, expected) < 1e-5
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(expected, twins, grad_out)
    for name, g, w in zip("abcdef", got, want):
        assert rel(g, w) < 1e-5, name


def test_swiglu_matches_the_reference(one_thread, monkeypatch):
    calls = counting(monkeypatch, sw_chunked, "_run")
    gen = torch.Generator().manual_seed(0)
    g, u = torch.randn(3, 170, 130, generator=gen) * 4, torch.randn(3, 170, 130, generator=gen)  # 2 pieces
    compare(swiglu, swiglu_reference, [g, u], torch.randn(3, 170, 130, generator=gen))
    assert len(calls) == (2 if one_thread else 0), native.unavailable_reason(sw_chunked.NAME)  # fwd and bwd
    g[0, 0, 0] = float("nan")
    assert torch.isnan(swiglu(g, u)[0, 0, 0]) and not torch.isnan(swiglu(g, u)[0, 0, 1:]).any()


@pytest.mark.parametrize("gated,group", [(False, None), (True, None), (True, 8), (False, 16)],
                         ids=["plain", "gated", "gated-groups", "groups"])
def test_rmsnorm_matches_the_reference(one_thread, monkeypatch, gated, group):
    calls = counting(monkeypatch, rms_native, "backward", counting(monkeypatch, rms_native, "forward"))
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 290, 48, generator=gen) * 3, torch.randn(48, generator=gen)  # 2 pieces of rows
    inputs = [x, w] + ([torch.randn(2, 290, 48, generator=gen)] if gated else [])

    def run(kernel):
        return lambda x, w, *z: kernel(x, w, z=z[0] if z else None, group_size=group, eps=1e-5)

    compare(run(rmsnorm), run(rmsnorm_reference), inputs, torch.randn(2, 290, 48, generator=gen))
    assert calls == [one_thread] * 2, native.unavailable_reason(rms_native.NAME)


def test_multihead_norm_matches_the_reference_with_a_strided_gate(one_thread, monkeypatch):
    """The gate as the mLSTM layer hands it over: a slice of a wider projection (no copy)."""
    calls = counting(monkeypatch, mh_chunked._GatedMultiHeadNorm, "apply")
    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(2, 301, 4, 8, generator=gen) * 2 + 1, torch.randn(32, generator=gen)
    wide = torch.randn(2, 301, 50, generator=gen)

    def gated(kernel):
        return lambda h, w, wide: kernel(h, w, 1e-6, wide[..., 10:42])

    compare(gated(multihead_norm), gated(multihead_norm_reference), [h, w, wide],
            torch.randn(2, 301, 32, generator=gen))
    assert calls == ([True] if one_thread else []), native.unavailable_reason(mh_chunked.NAME)


def test_the_loops_step_aside_where_they_do_not_apply(monkeypatch):
    """float64, or several torch threads without torch's OpenMP runtime in the library: PyTorch's ops
    (the same results), never the native loops."""
    calls = counting(monkeypatch, sw_chunked, "_run")
    g, u = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(swiglu(g, u), swiglu_reference(g, u))
    monkeypatch.setattr(native, "uses_openmp", lambda name: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.elementwise_parts(sw_chunked.NAME, 1 << 20, 1) is None
        torch.testing.assert_close(swiglu(g.float(), u.float()), swiglu_reference(g.float(), u.float()))
    finally:
        torch.set_num_threads(threads)
    assert not calls
