"""titans_memory's Triton backend (triton_linear.py: the linear memory under the Titans rule) against the
token-by-token reference with the same chunk-start rule, in float64: outputs, final weights and momentum
and the gradient of every input (q, k, v, theta, eta, alpha, gamma, M_0, the initial state) within 1e-4
in float32; documents inside and across chunks and on their edges; lengths that are not multiples of the
chunk, a chunk longer than the row, chunk 1 (the exact rule); Dk != Dv over several v tiles; the sgd /
no-retention rule; state carried across calls; the dispatch (CPU keeps the chunked form; a forced
"triton" on a configuration it does not implement raises the reason). On CPU the kernels run in
Triton's interpreter (TRITON_INTERPRET=1, tests/kernels/conftest.py) at tiny shapes."""

import pytest
import torch

from tests.kernels.test_causal_conv1d import DEVICE, triton_runnable
from tests.kernels.test_titans_memory import RULES, assert_close, doc_ids_for, make_inputs
from undertow.kernels.titans_memory import IMPLEMENTATIONS, MemoryState, UpdateRule, titans_memory
from undertow.kernels.titans_memory.reference import titans_memory_reference

TRITON = triton_runnable(IMPLEMENTATIONS, "undertow.kernels.titans_memory.triton_linear_kernels")
pytestmark = pytest.mark.skipif(not TRITON, reason="the Triton form runs on CUDA or in the interpreter "
                                                   "(TRITON_INTERPRET=1)")
TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def on_device(q, k, v, theta, eta, alpha, init_weights, *, gamma=None, initial_state=None, doc_ids=None, **kwargs):
    """The Triton backend on DEVICE for CPU tensors, results back on the CPU (differentiable moves)."""
    from undertow.kernels.titans_memory.triton_linear import titans_memory_triton

    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    init = None if initial_state is None else MemoryState(tuple(map(move, initial_state.weights)),
                                                          tuple(map(move, initial_state.momentum)), None)
    out = titans_memory_triton(*map(move, (q, k, v, theta, eta, alpha)), tuple(map(move, init_weights)),
                               gamma=move(gamma), initial_state=init, doc_ids=move(doc_ids), **kwargs)
    if not kwargs.get("return_final_state"):
        return out.cpu()
    y, final = out
    return y.cpu(), MemoryState(tuple(w.cpu() for w in final.weights), tuple(s.cpu() for s in final.momentum), None)


def linear_inputs(B, T, H, Dk, Dv, *, seed, init=True, rule=RULES["titans"]):
    """test_titans_memory.make_inputs for a linear memory of Dk -> Dv (v, M_0 and the carried state redrawn)."""
    inputs = make_inputs(B, T, H, Dk, 1, rule, seed=seed, init=False)
    gen = torch.Generator().manual_seed(seed + 1)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    inputs["v"] = rnd(B, T, H, Dv)
    inputs["init_weights"] = (0.4 * rnd(H, Dk, Dv),)
    if init:
        inputs["initial_state"] = MemoryState((inputs["init_weights"][0] + 0.2 * rnd(B, H, Dk, Dv),),
                                              (0.2 * rnd(B, H, Dk, Dv),), None)
    return inputs


@pytest.fixture
def v_tile(monkeypatch):
    """set(width): caps both kernels' v tile (at least 16, tl.dot's smallest side), so Dv = 20 splits in two."""
    from undertow.kernels.titans_memory import triton_linear

    return lambda width: monkeypatch.setattr(triton_linear, "BLOCK_V", dict.fromkeys(triton_linear.BLOCK_V, width))


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("docs", ["none", "inside", "edges"])
def test_matches_reference_with_documents(docs, init):
    """T = 11 in chunks of 4 (the last one short), two heads; M_0's gradient through restarts (and through
    the row's start when there is no initial state)."""
    B, T, H, D, C = 2, 11, 2, 4, 4
    inputs = make_inputs(B, T, H, D, 1, RULES["titans"], seed=7 + len(docs), init=init)
    kwargs = dict(rule=RULES["titans"], chunk_size=C, doc_ids=doc_ids_for(docs, B, T, C))
    assert_close(on_device, titans_memory_reference, inputs, kwargs, TOL)


@pytest.mark.parametrize("T, H, Dk, Dv, chunk, docs", [
    (13, 1, 6, 20, 5, "inside"),  # two v tiles (16 + 4 masked), a chunk that divides nothing
    (18, 1, 5, 6, 17, "inside"),  # a token tile of 32 (next power of two of 17)
    (3, 2, 4, 4, 8, "none"),  # one chunk longer than the row
    (5, 1, 4, 3, 1, "inside"),  # chunk 1: the paper's exact token-by-token rule
])
def test_shapes_tiles_and_chunks(T, H, Dk, Dv, chunk, docs, v_tile):
    v_tile(16)
    inputs = linear_inputs(2, T, H, Dk, Dv, seed=T + Dv)
    kwargs = dict(rule=RULES["titans"], chunk_size=chunk, doc_ids=doc_ids_for(docs, 2, T, chunk))
    assert_close(on_device, titans_memory_reference, inputs, kwargs, TOL)


def test_sgd_without_retention_and_without_gamma():
    """eta and alpha unread (no gradient), gamma None (1)."""
    rule = RULES["sgd_no_decay"]
    inputs = make_inputs(2, 9, 2, 4, 1, rule, seed=5)
    del inputs["gamma"]
    assert_close(on_device, titans_memory_reference, inputs, dict(rule=rule, chunk_size=4), TOL)


def test_state_carries_across_calls():
    """Two calls split on a chunk edge, the first one's final state passed on, equal one call."""
    inputs = linear_inputs(2, 12, 2, 4, 4, seed=11)
    names = ("q", "k", "v", "theta", "eta", "alpha")
    args = [inputs[n].float() for n in names]
    M0 = tuple(w.float() for w in inputs["init_weights"])
    kw = dict(gamma=inputs["gamma"].float(), chunk_size=4, return_final_state=True)
    y, final = on_device(*args, M0, **kw)
    y1, mid = on_device(*(a[:, :8] for a in args), M0, **{**kw, "gamma": kw["gamma"][:, :8]})
    y2, end = on_device(*(a[:, 8:] for a in args), M0, **{**kw, "gamma": kw["gamma"][:, 8:]}, initial_state=mid)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(end.weights[0], final.weights[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(end.momentum[0], final.momentum[0], rtol=1e-5, atol=1e-6)


def test_empty_row_returns_the_initial_state():
    inputs = linear_inputs(1, 0, 1, 4, 4, seed=2)
    args = [inputs[n].float() for n in ("q", "k", "v", "theta", "eta", "alpha")]
    state = MemoryState(tuple(w.float() for w in inputs["initial_state"].weights),
                        tuple(s.float() for s in inputs["initial_state"].momentum), None)
    y, final = on_device(*args, (inputs["init_weights"][0].float(),), initial_state=state, return_final_state=True)
    assert y.shape == (1, 0, 1, 4)
    assert torch.equal(final.weights[0], state.weights[0]) and torch.equal(final.momentum[0], state.momentum[0])


@pytest.mark.parametrize("depth, rule", [(2, "titans"), (1, "huber"), (1, "omega"), (1, "clipped")])
def test_unimplemented_configurations_are_refused_when_forced_and_skipped_by_default(depth, rule):
    """Forced "triton" on an MLP memory or another rule raises, naming the way out; unforced, the choice
    leaves "triton" out (on CUDA the default then runs the chunked form)."""
    from undertow.kernels.titans_memory.triton_linear import usable

    inputs = make_inputs(1, 4, 1, 4, depth, RULES[rule], seed=1, init=False)
    args = [inputs[n].float() for n in ("q", "k", "v", "theta", "eta", "alpha")]
    M0 = tuple(w.float() for w in inputs["init_weights"])
    with pytest.raises(ValueError, match="backend='chunked'"):
        titans_memory(*args, M0, rule=RULES[rule], backend="triton")
    assert "triton" not in usable(IMPLEMENTATIONS, args[0], M0, RULES[rule], None)
    assert "triton" in usable(IMPLEMENTATIONS, args[0], M0[:1] if depth == 1 else (torch.ones(1, 4, 4),),
                              UpdateRule(), None)


def test_dispatch_forced_triton_and_cpu_default(monkeypatch):
    """backend='triton' runs this backend (equal to the chunked form); unforced on CPU, the chunked form."""
    from undertow.kernels.titans_memory import triton_linear

    monkeypatch.delenv("UNDERTOW_KERNEL_BACKEND", raising=False)
    inputs = make_inputs(1, 6, 1, 4, 1, RULES["titans"], seed=3, init=False)
    args = [inputs[n].float() for n in ("q", "k", "v", "theta", "eta", "alpha")]
    M0 = tuple(w.float() for w in inputs["init_weights"])
    calls = []
    monkeypatch.setattr(triton_linear, "_run", lambda *a: calls.append(a) or torch.zeros(1))
    monkeypatch.setitem(IMPLEMENTATIONS, "triton", triton_linear.titans_memory_triton)
    titans_memory(*args, M0, chunk_size=4, backend="triton")
    assert len(calls) == 1
    if DEVICE == "cpu":
        titans_memory(*args, M0, chunk_size=4)  # the chunked form: _run is not called again
        assert len(calls) == 1


def _bench_script():
    """scripts/bench_titans_gpu.py as a module (scripts/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_titans_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_titans_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_script_parses_and_dry_runs(tmp_path):
    """The GPU line (gpu_check.sh part 2f) parses on CPU with the anchors' shape by default, refuses bad
    values by name, and its --dry-run runs every row of ours in the interpreter and writes its files."""
    bench = _bench_script()
    args = bench.parse_args([])
    assert (args.batch, args.T, args.heads, args.dim, args.chunk) == (8, 2048, 16, 128, 64)
    with pytest.raises(SystemExit):
        bench.parse_args(["--chunk", "0"])
    if DEVICE == "cuda":
        return
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main([])
    bench.main(["--dry-run", "--no-fp32", "--out", str(tmp_path)])
    table = (tmp_path / "bench_titans_gpu.md").read_text()
    assert bench.OURS_BF16 in table and bench.CHUNKED in table and "FAILED" not in table


def test_nan_guard_skips_a_poisoned_token():
    """A token whose target is NaN contributes no update: the same as that token with theta = 0 (as the
    chunked form's guard); its v and theta get zero gradients, the others finite ones."""
    inputs = linear_inputs(1, 10, 2, 4, 4, seed=5, init=False)
    inputs = {n: (tuple(w.float() for w in x) if n == "init_weights" else x.float()) for n, x in inputs.items()}
    poisoned = dict(inputs, v=inputs["v"].clone().requires_grad_(), theta=inputs["theta"].clone().requires_grad_())
    poisoned["v"].data[0, 4] = float("nan")
    skipped = dict(inputs, theta=inputs["theta"].clone())
    skipped["theta"][0, 4] = 0.0
    y = on_device(**poisoned, chunk_size=4)
    assert torch.isfinite(y).all()
    assert (y - on_device(**skipped, chunk_size=4)).abs().max() <= 1e-6
    y.square().sum().backward()
    for grad in (poisoned["v"].grad, poisoned["theta"].grad):
        assert torch.isfinite(grad).all() and not grad[0, 4].any() and grad.any()


@pytest.mark.skipif(DEVICE != "cuda", reason="half-precision tl.dot: compiled kernels only (the GPU run)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_on_the_gpu(dtype):
    """bf16 / fp16 inputs (tf32 products, float32 states): outputs and gradients near the float64 reference
    on the same rounded values (what is left: tf32 products and the half-precision results)."""
    inputs = make_inputs(2, 37, 2, 16, 1, RULES["titans"], seed=4)
    rounded = lambda x: x.to(dtype).double()  # noqa: E731
    inputs = {n: (type(x)(*(None if part is None else tuple(map(rounded, part)) for part in x))
                  if n == "initial_state" else tuple(map(rounded, x)) if n == "init_weights" else rounded(x))
              for n, x in inputs.items()}
    kwargs = dict(rule=RULES["titans"], chunk_size=16, doc_ids=doc_ids_for("inside", 2, 37, 16))
    assert_close(on_device, titans_memory_reference, inputs, kwargs, 2e-2, dtype=dtype)
