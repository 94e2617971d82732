"""mlstm's fused recurrent Triton form (triton.py: kernel, hand-written backward) against autograd through the
reference in float64 on the same input values: outputs, final (C, n, m) and the gradients of q, k, v,
i, f and of the initial (C, n, m), in every gate regime of test_mlstm.py (each side of each max wins),
with several chunks (the backward's checkpoints), documents inside and across chunks, head dims that
are not powers of two and several v tiles. On CPU the kernels run in Triton's interpreter at small
shapes (slow: every case is sized to keep this file near 30 s on two loaded cores)."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.test_causal_conv1d import DEVICE, triton_runnable
from tests.kernels.test_mlstm import GATES, INPUTS, doc_ids_for, errors_against_reference, make_inputs, run
from undertow.kernels.mlstm import IMPLEMENTATIONS, mlstm
from undertow.kernels.mlstm.reference import mlstm_reference

TRITON = triton_runnable(IMPLEMENTATIONS, "undertow.kernels.mlstm.triton")
pytestmark = pytest.mark.skipif(not TRITON,
                                reason="the Triton form runs on CUDA or in the interpreter (TRITON_INTERPRET=1)")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def recurrent_form(monkeypatch):
    """This file tests the fused recurrent form: "triton" picks it only under UNDERTOW_MLSTM_TRITON=recurrent
    (the chunkwise form, the default, is tested in test_mlstm_triton_chunk.py)."""
    monkeypatch.setenv("UNDERTOW_MLSTM_TRITON", "recurrent")


@pytest.fixture
def v_tile(monkeypatch):
    """set(width): caps the kernels' v tile, so small Dv still splits into several programs (the
    gradients of q, k, i, f are then sums of per-tile partials)."""
    from undertow.kernels.mlstm import triton as mlstm_triton_module

    return lambda width: monkeypatch.setattr(mlstm_triton_module, "BLOCK_V", width)


def on_device(inputs: dict) -> dict:
    """The inputs (q, k, v, i, f and the initial state) on DEVICE."""
    out = {name: inputs[name].to(DEVICE) for name in INPUTS}
    if inputs.get("initial_state") is not None:
        out["initial_state"] = tuple(s.to(DEVICE) for s in inputs["initial_state"])
    return out


def triton_on_device(q, k, v, i, f, *, initial_state=None, doc_ids=None, **kwargs):
    """The Triton form run on DEVICE for CPU tensors, results back on the CPU (the moves are
    differentiable): test_mlstm.py's helpers then compare it with the reference on the CPU."""
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    init = None if initial_state is None else tuple(move(s) for s in initial_state)
    h, (C, n, m) = IMPLEMENTATIONS["triton"](*(move(t) for t in (q, k, v, i, f)), initial_state=init,
                                             doc_ids=move(doc_ids), **kwargs)
    return h.cpu(), (C.cpu(), n.cpu(), m.cpu())


def triton_errors(inputs: dict, chunk: int, doc_ids) -> dict:
    """Relative errors of the Triton form on `inputs` (CPU) against the reference on their float64 values."""
    exact = {name: inputs[name].double() for name in INPUTS}
    if inputs.get("initial_state") is not None:
        exact["initial_state"] = tuple(s.double() for s in inputs["initial_state"])
    return errors_against_reference(triton_on_device, inputs, {"chunk_size": chunk, "doc_ids": doc_ids}, exact)


def assert_errors_below(errors: dict, tol: float) -> None:
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


@pytest.mark.parametrize("gates", list(GATES))
def test_every_gate_regime_with_documents_across_chunks(gates, v_tile):
    """T = 33 in chunks of 4 (nine checkpoints, the last chunk one token), document starts on chunk edges
    and inside chunks, carried initial state; Dv = 6 in two v tiles of 4 (the second one masked)."""
    v_tile(4)
    inputs = make_inputs(2, 33, 1, 8, 6, torch.float32, seed=len(gates), gates=gates)
    assert_errors_below(triton_errors(inputs, 4, doc_ids_for("edges", 2, 33, 4)), TOL[torch.float32])


@pytest.mark.parametrize("T, Dqk, Dv, chunk, docs, init, tile", [
    (1, 4, 8, 4, "none", True, 4),  # one token: the first chunk's checkpoint is the initial state
    (9, 8, 4, 4, "inside", False, 32),  # the zero state (m = 0), one v tile
    (9, 6, 8, 16, "inside", True, 4),  # Dqk = 6 (masked lanes of k and q), one chunk longer than the row
    (33, 4, 8, 5, "inside", True, 2),  # four v tiles, chunks that divide nothing
])
def test_shapes_chunks_and_tiles(T, Dqk, Dv, chunk, docs, init, tile, v_tile):
    v_tile(tile)
    inputs = make_inputs(2, T, 1, Dqk, Dv, torch.float32, seed=T + Dqk, init=init)
    assert_errors_below(triton_errors(inputs, chunk, doc_ids_for(docs, 2, T, chunk)), TOL[torch.float32])


def test_several_heads(v_tile):
    """H = 3: heads are separate programs reading interleaved (B, T, H, D) rows."""
    v_tile(4)
    inputs = make_inputs(1, 12, 3, 4, 6, torch.float32, seed=7, gates="weak_forget")
    assert_errors_below(triton_errors(inputs, 4, None), TOL[torch.float32])


def _tied_inputs(i_at_ties: float) -> dict:
    """f~ = 1000 (logsigmoid = 0 exactly, in float32 and float64), the zero state (m = 0) and i~ <= 0: m
    stays 0 and every third step ties the stabilizer's max (i~ = 0 = logsigmoid(f~) + m) unless moved."""
    gen = torch.Generator().manual_seed(11)
    inputs = make_inputs(2, 12, 1, 4, 4, torch.float32, seed=11, init=False)
    i = -torch.rand(2, 12, 1, generator=gen)
    i[:, ::3] = i_at_ties
    return inputs | {"i": i, "f": torch.full((2, 12, 1), 1000.0)}


def test_stabilizer_ties_follow_torch_maximum():
    """At a tie torch.maximum's backward sends half of dm to each side; the kernel must too. The tie is
    made to matter: the reference's gradient of i~ at a tie differs from both one-sided ones."""
    tied = _tied_inputs(0.0)
    grad_i = lambda inputs: run(mlstm_reference, {n: inputs[n].double() for n in INPUTS}, {})[2]["i"]  # noqa: E731
    g_tie, g_above, g_below = grad_i(tied), grad_i(_tied_inputs(1e-9)), grad_i(_tied_inputs(-1e-9))
    gap = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert gap(g_tie, g_above) > 1e-2 and gap(g_tie, g_below) > 1e-2
    assert_errors_below(triton_errors(tied, 4, None), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
def test_half_precision_inputs(dtype, v_tile):
    """bf16 on a GPU only (scripts/gpu_check.sh): the interpreter's bf16 is not trusted."""
    v_tile(4)
    inputs = make_inputs(2, 17, 1, 8, 6, dtype, seed=3)
    assert_errors_below(triton_errors(inputs, 4, doc_ids_for("inside", 2, 17, 4)), TOL[dtype])


def test_forward_without_gradient_equals_training_forward():
    """Under no_grad the forward stores no checkpoints: same h and final state, bit for bit."""
    inputs = on_device(make_inputs(2, 11, 1, 4, 6, torch.float32, seed=5))
    kwargs = dict(chunk_size=4, doc_ids=doc_ids_for("inside", 2, 11, 4).to(DEVICE), return_final_state=True,
                  backend="triton")
    with torch.no_grad():
        h, final = mlstm(**inputs, **kwargs)
    leaves = {name: inputs[name].clone().requires_grad_() for name in INPUTS}
    h_train, final_train = mlstm(**leaves, initial_state=inputs["initial_state"], **kwargs)
    assert torch.equal(h, h_train.detach()) and all(torch.equal(a, b) for a, b in zip(final, final_train))


def test_float64_is_refused_by_name():
    inputs = make_inputs(1, 3, 1, 4, 4, torch.float64, seed=1)
    with pytest.raises(ValueError, match="float64"):
        IMPLEMENTATIONS["triton"](**on_device(inputs))


def test_strided_inputs():
    """q, k, v as views of a fused projection (B, T, H, 2 Dqk + Dv) give their contiguous copies' result."""
    inputs = make_inputs(1, 7, 2, 4, 4, torch.float32, seed=9)
    fused = torch.cat([inputs["q"], inputs["k"], inputs["v"]], dim=-1).to(DEVICE)
    views = {"q": fused[..., :4], "k": fused[..., 4:8], "v": fused[..., 8:], "i": inputs["i"].to(DEVICE),
             "f": F.pad(inputs["f"], (0, 1))[..., :2].to(DEVICE)}
    assert not views["q"].is_contiguous() and not views["f"].is_contiguous()
    h = mlstm(**views, chunk_size=4, backend="triton")
    h_contiguous = mlstm(**{k: v.contiguous() for k, v in views.items()}, chunk_size=4, backend="triton")
    torch.testing.assert_close(h, h_contiguous, rtol=0, atol=0)


def _bench_script():
    """scripts/bench_mlstm_gpu.py as a module (scripts/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_mlstm_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_mlstm_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_script_parses_its_arguments():
    """The GPU benchmark (gpu_check.sh) imports and parses on CPU: the issue's shape by default, bad values
    refused by name."""
    bench = _bench_script()
    args = bench.parse_args([])
    assert (args.batch, args.T, args.heads, args.dqk, args.dv, args.tfla_chunk) == (8, 2048, 16, 128, 128, 128)
    assert bench.parse_args(["--T", "64", "--reps", "3"]).T == 64
    with pytest.raises(SystemExit):
        bench.parse_args(["--chunk", "0"])
    if DEVICE != "cuda":
        with pytest.raises(SystemExit, match="no CUDA device"):
            bench.main([])
