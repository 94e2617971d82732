"""mlstm: the reference against transformers' and mlstm_kernels' native mLSTM, and every backend
against autograd through the reference (outputs, final (C, n, m), gradients of every input and of
the initial state), with gates that make each branch of the stabilizer and of the denominator win."""

import inspect

import pytest
import torch

from tests import oracles
from undertow.kernels import native
from undertow.kernels.mlstm import IMPLEMENTATIONS, mlstm, mlstm_step
from undertow.kernels.mlstm import native as mlstm_native
from undertow.kernels.mlstm.reference import mlstm_reference

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def cpu_form(request, monkeypatch):
    """Every test twice: the chunked backend's CPU path as the native recurrence (native.py, float32
    and half inputs with small head states) and as the PyTorch chunkwise form."""
    monkeypatch.setattr(mlstm_native, "ENABLED", request.param == "native")
    return request.param
INPUTS = ("q", "k", "v", "i", "f")

# Gate pre-activations (i~, f~) per regime: (mean, spread) of each. In xLSTM-7B they are soft-capped at 15.
GATES = {
    "mixed": ((0.0, 3.0), (2.0, 3.0)),
    "strong_forget": ((0.0, 1.0), (-4.0, 1.0)),  # f' ~ e^-4 a step: the input gate wins the max
    "weak_forget": ((0.0, 1.0), (6.0, 1.0)),  # f' ~ 1: the carried m wins the max
    "large_input": ((8.0, 3.0), (3.0, 1.0)),  # |n^T q| wins the denominator
    "exp_branch": ((-10.0, 1.0), (4.0, 1.0)),  # xLSTM-7B's input-gate bias -10: exp(-m) wins the denominator
}


def doc_ids_for(kind: str, B: int, T: int, chunk: int) -> torch.Tensor | None:
    """None, or (B, T) ids with starts inside chunks ("inside"), or on a chunk's last and first tokens
    and their neighbours ("edges"); row 1 has every other start of row 0."""
    if kind == "none":
        return None
    starts = {"inside": [3, chunk + 5, 2 * chunk + 1], "edges": [chunk - 1, chunk, chunk + 1, 2 * chunk, 2 * chunk + 2]}[kind]
    ids = torch.zeros(B, T, dtype=torch.long)
    for row in range(B):
        for s in starts if row == 0 else starts[1::2]:
            if 0 < s < T:
                ids[row, s:] += 1
    return ids


def make_inputs(B, T, H, Dqk, Dv, dtype, *, seed, gates="mixed", init=True):
    """Fresh random inputs (never zeros); initial state with m drawn around the gates' scale."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    (i_mean, i_std), (f_mean, f_std) = GATES[gates]
    inputs = {"q": rnd(B, T, H, Dqk), "k": rnd(B, T, H, Dqk), "v": rnd(B, T, H, Dv),
              "i": i_mean + i_std * rnd(B, T, H), "f": f_mean + f_std * rnd(B, T, H)}
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    if init:  # a state a previous run could leave: C, n scaled by exp(-m)
        m = i_mean + 2 * rnd(B, H)
        inputs["initial_state"] = tuple(s.to(dtype if dtype == torch.float64 else torch.float32) for s in
                                        (rnd(B, H, Dqk, Dv), rnd(B, H, Dqk), m))
    return inputs


def run(fn, inputs: dict, kwargs: dict, cotangents=None):
    """fn(**inputs, **kwargs, return_final_state=True) on fresh leaves; backpropagates fixed cotangents
    of h and of the final (C, n, m). Returns h, final, {name: grad}, cotangents."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in INPUTS}
    init = inputs.get("initial_state")
    init = tuple(s.detach().clone().requires_grad_() for s in init) if init is not None else None
    h, final = fn(**leaves, initial_state=init, **kwargs, return_final_state=True)
    if cotangents is None:
        gen = torch.Generator().manual_seed(0)
        cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (h, *final)]
    loss = sum((t.double() * c).sum() for t, c in zip((h, *final), cotangents))
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items()}
    if init is not None:
        grads.update({f"initial {name}": s.grad for name, s in zip("Cnm", init)})
    return h, final, grads, cotangents


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf for a NaN or inf anywhere, or a missing gradient."""
    if out is None or not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def errors_against_reference(fn, inputs: dict, kwargs: dict, reference_inputs: dict | None = None) -> dict:
    """Relative errors of fn's h, final (C, n, m) and gradients against autograd through the reference."""
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    h_ref, f_ref, g_ref, cot = run(mlstm_reference, reference_inputs or inputs, ref_kwargs)
    h, f, g, _ = run(fn, inputs, kwargs, cot)
    state_dtype = torch.float64 if inputs["q"].dtype == torch.float64 else torch.float32
    assert h.dtype == inputs["q"].dtype and all(s.dtype == state_dtype for s in f)
    errors = {"h": relative_error(h, h_ref)}
    errors.update({f"final {name}": relative_error(a, b) for name, a, b in zip("Cnm", f, f_ref)})
    errors.update({f"grad {name}": relative_error(g[name], ref) for name, ref in g_ref.items()})
    return errors


def assert_close_to_reference(fn, inputs, kwargs, tol, reference_inputs=None):
    errors = errors_against_reference(fn, inputs, kwargs, reference_inputs)
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


# ---- the reference against the outside oracles ----------------------------------------------------

def _transformers_native():
    """transformers' native mLSTM functions, found by signature (names change between releases):
    {"step": fn, "sequence": fn, "chunkwise": [fn, ...]}; empty when transformers uses the external
    xlstm package (then its native code is not defined)."""
    module = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")
    found = {"chunkwise": []}
    for fn in vars(module).values():
        if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
            continue
        params = inspect.signature(fn).parameters
        if not {"query", "key", "value", "igate", "fgate"} <= set(params) or any("kernel" in p for p in params):
            continue  # not an mLSTM function, or a wrapper taking other kernels as arguments
        if "chunk_size" in params:
            found["chunkwise"].append(fn)
        elif params["cstate"].default is inspect.Parameter.empty if "cstate" in params else False:
            found["step"] = fn
        else:
            found["sequence"] = fn
    return found


def _call_native(fn, q, k, v, i, f, state, **extra):
    """Call an mLSTM function of transformers/mlstm_kernels ((B, H, T, D) layout, m (B, H, 1)) with
    whatever its initial-state keywords are called; returns (h (B, T, H, Dv), (C, n, m (B, H)))."""
    params = inspect.signature(fn).parameters
    names = ("c_initial", "n_initial", "m_initial") if "c_initial" in params else ("cstate", "nstate", "mstate")
    C, n, m = state
    kwargs = dict(zip(names, (C, n, m[..., None])), **extra)
    for key, value in (("return_last_states", True), ("dtype_state", q.dtype)):
        if key in params:
            kwargs[key] = value
    if "query" in params:
        kwargs.update(query=q, key=k, value=v, igate=i, fgate=f)
        out = fn(**kwargs)
    else:
        out = fn(q, k, v, i, f, **kwargs)
    h, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    states = next(s for s in rest if isinstance(s, tuple) and len(s) == 3)
    return h, (states[0], states[1], states[2].reshape(m.shape))


def _heads_first(inputs):
    q, k, v, i, f = (inputs[n].transpose(1, 2).contiguous() for n in INPUTS)
    return q, k, v, i, f


def _assert_matches_reference(h, state, inputs, tol):
    h_ref, s_ref = mlstm_reference(**inputs, return_final_state=True)
    errors = [relative_error(h.transpose(1, 2) if h.shape != h_ref.shape else h, h_ref)]
    errors += [relative_error(a, b) for a, b in zip(state, s_ref)]
    assert max(errors) <= tol, errors


@pytest.mark.parametrize("gates", ["mixed", "exp_branch", "large_input"])
def test_reference_matches_transformers_native(gates):
    native = _transformers_native()
    if not native.get("step") and not native["chunkwise"]:
        pytest.skip("transformers defines no native mLSTM functions here (it uses the installed xlstm package)")
    for init in (False, True):
        inputs = make_inputs(2, 32, 2, 8, 6, torch.float64, seed=5 + init, gates=gates, init=init)
        q, k, v, i, f = _heads_first(inputs)
        state = inputs.get("initial_state") or tuple(torch.zeros(s, dtype=torch.float64) for s in
                                                     ((2, 2, 8, 6), (2, 2, 8), (2, 2)))
        ran = []
        for fn in native["chunkwise"]:  # transformers 5.25's mlstm_chunkwise_fw is broken (calls Tensor.logsigmoid)
            try:
                h, final = _call_native(fn, q, k, v, i, f, state, chunk_size=8)
            except AttributeError:
                continue
            _assert_matches_reference(h, final, inputs, 1e-10)
            ran.append(fn.__name__)
        assert ran or not native["chunkwise"], "none of transformers' chunkwise mLSTM functions runs"
        if "sequence" in native:
            h, final = _call_native(native["sequence"], q, k, v, i, f, state)
            _assert_matches_reference(h, final, inputs, 1e-10)
        if "step" in native:  # one token
            h, final = _call_native(native["step"], q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, :1], f[:, :, :1], state)
            one = {n: inputs[n][:, :1] for n in INPUTS} | {"initial_state": inputs.get("initial_state")}
            _assert_matches_reference(h[:, None], final, one, 1e-10)


def test_reference_matches_mlstm_kernels_chunkwise():
    """mlstm_kernels from its wheel (tests/oracles.py): not installed, so nothing else sees it."""
    inputs = make_inputs(2, 32, 2, 8, 6, torch.float64, seed=9, gates="mixed")
    q, k, v, i, f = _heads_first(inputs)
    with oracles.importing("mlstm_kernels", "mlstm_kernels.torch.chunkwise.native") as native:
        h, final = _call_native(native.mlstm_chunkwise__native_autograd, q, k, v, i, f, inputs["initial_state"],
                                chunk_size=8)
    _assert_matches_reference(h, final, inputs, 1e-10)


@pytest.mark.parametrize("gates,branch", [("large_input", "n"), ("exp_branch", "exp")])
def test_gate_regimes_make_each_denominator_branch_win(gates, branch):
    """The regimes used below do exercise both sides of max(|n^T q|, exp(-m))."""
    inputs = make_inputs(2, 37, 2, 8, 6, torch.float64, seed=1, gates=gates)
    state, wins = inputs["initial_state"], []
    for t in range(37):
        _, state = mlstm_step(*(inputs[n][:, t] for n in INPUTS), state)
        C, n, m = state
        wins.append(((n * inputs["q"][:, t] * 8 ** -0.5).sum(-1).abs() > torch.exp(-m)).double().mean())
    share = torch.stack(wins).mean().item()
    assert share > 0.9 if branch == "n" else share == 0.0


# ---- chunked against the reference -------------------------------------------------------------------

def test_the_native_recurrence_runs_where_it_applies(cpu_form, monkeypatch):
    """float32 CPU inputs with a head state up to MAX_STATE entries take the native recurrence (also at
    Dqk 32 x Dv 64, against the float64 reference); float64 and, with gradients, larger states the
    PyTorch form; without gradients every state size the native one."""
    if cpu_form != "native" or native.find_compiler() is None:
        pytest.skip("the native form, built by a C++ compiler")
    calls = []
    real = mlstm_native._run
    monkeypatch.setattr(mlstm_native, "_run", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs(2, 45, 2, 32, 64, torch.float32, seed=7)
    exact = {k: v.double() if torch.is_tensor(v) else tuple(s.double() for s in v) for k, v in inputs.items()}
    assert_close_to_reference(IMPLEMENTATIONS["chunked"], inputs,
                              {"chunk_size": 16, "doc_ids": doc_ids_for("edges", 2, 45, 16)}, TOL[torch.float32], exact)
    assert calls, native.unavailable_reason(mlstm_native.NAME)
    # Dqk 20 x Dv 24: the vector loops' leftovers (a 16-lane vector and 8 channels; 16 rows summed
    # across lanes at once and 4 one by one)
    odd = make_inputs(2, 21, 2, 20, 24, torch.float32, seed=17)
    exact = {k: v.double() if torch.is_tensor(v) else tuple(s.double() for s in v) for k, v in odd.items()}
    assert_close_to_reference(IMPLEMENTATIONS["chunked"], odd, {"chunk_size": 8}, TOL[torch.float32], exact)
    calls.clear()
    IMPLEMENTATIONS["chunked"](**make_inputs(1, 9, 1, 4, 4, torch.float64, seed=8), chunk_size=4)
    big = make_inputs(1, 9, 1, 64, 128, torch.float32, seed=8)
    big["q"].requires_grad_()
    IMPLEMENTATIONS["chunked"](**big, chunk_size=4)
    assert not calls
    with torch.no_grad():
        h = IMPLEMENTATIONS["chunked"](**big, chunk_size=4)
    assert calls
    assert ((h - mlstm_reference(**big)).norm() / h.norm()).item() < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gates", list(GATES))
@pytest.mark.parametrize("T,docs,init", [(1, "none", True), (37, "none", False), (37, "inside", True),
                                         (37, "edges", True), (32, "edges", False)])
def test_chunked_matches_reference(dtype, gates, T, docs, init):
    inputs = make_inputs(2, T, 2, 8, 6, dtype, seed=T + len(gates), gates=gates, init=init)
    kwargs = {"chunk_size": 16, "doc_ids": doc_ids_for(docs, 2, T, 16)}
    if dtype == torch.float32 and gates == "large_input":
        # h = C^T q / |n^T q| with n^T q crossing near zero: float32 is ill-conditioned here (the float32
        # reference itself is 2e-5..2e-4 off the float64 one). Checked against float64 instead: no worse
        # than 10x the float32 reference's own error.
        exact = make_inputs(2, T, 2, 8, 6, torch.float64, seed=T + len(gates), gates=gates, init=init)
        own = errors_against_reference(mlstm_reference, inputs, {"doc_ids": kwargs["doc_ids"]}, exact)
        ours = errors_against_reference(IMPLEMENTATIONS["chunked"], inputs, kwargs, exact)
        bad = {k: (e, own[k]) for k, e in ours.items() if not e <= max(TOL[dtype], 10 * own[k])}
        assert not bad, f"(chunked, reference) float32 errors against float64: {bad}"
        return
    assert_close_to_reference(IMPLEMENTATIONS["chunked"], inputs, kwargs, TOL[dtype])


def test_the_native_recurrence_inside_torch_compile(cpu_form, monkeypatch):
    """Under torch.compile the recurrence is a custom operator with a fake implementation and an
    autograd formula: a compiled function traces it (no graph break: fullgraph) and gives the
    reference's outputs, final state and gradients (aot_eager: the traced graphs, run without
    inductor's code generation)."""
    if cpu_form != "native" or native.find_compiler() is None:
        pytest.skip("the native form, built by a C++ compiler")
    calls = []
    real = mlstm_native._run
    monkeypatch.setattr(mlstm_native, "_run", lambda *a: calls.append(1) or real(*a))
    fn = torch.compile(IMPLEMENTATIONS["chunked"], backend="aot_eager", fullgraph=True)
    inputs = make_inputs(2, 21, 2, 8, 6, torch.float32, seed=9)
    assert_close_to_reference(fn, inputs, {"chunk_size": 8, "doc_ids": doc_ids_for("inside", 2, 21, 8)},
                              TOL[torch.float32])
    assert len(calls) >= 2, native.unavailable_reason(mlstm_native.NAME)  # forward and backward natively
    torch._dynamo.reset()


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_any_chunk_size(chunk):
    """Chunks of one token, a size that divides nothing, and one chunk larger than the row."""
    inputs = make_inputs(2, 23, 3, 4, 5, torch.float64, seed=chunk)
    assert_close_to_reference(IMPLEMENTATIONS["chunked"], inputs,
                              {"chunk_size": chunk, "doc_ids": doc_ids_for("inside", 2, 23, 5)}, TOL[torch.float64])


def test_chunked_head_dims_of_a_real_model():
    """Dqk 64, Dv 128 (xLSTM-7B's qk/v ratio), float32, the default chunk 64 with T not a multiple:
    against the float64 reference (the exact answer; the float32 reference's own gradients are ~6e-6
    off it at these sizes, so float32 against float32 would measure both roundings)."""
    inputs = make_inputs(1, 80, 2, 64, 128, torch.float32, seed=3)
    exact = {k: v.double() if torch.is_tensor(v) else tuple(s.double() for s in v) for k, v in inputs.items()}
    assert_close_to_reference(IMPLEMENTATIONS["chunked"], inputs,
                              {"chunk_size": 64, "doc_ids": doc_ids_for("edges", 1, 80, 64)}, TOL[torch.float32], exact)


def test_chunked_bf16_inputs():
    """bf16 q/k/v/gates: against the reference on the same bf16 inputs (the same casts at the interface:
    h and the gradients rounded to bf16, which the mixed gates' 1/|n^T q| amplifies to ~1e-2 against
    float32 for both forms alike): <= 1e-2 (DESIGN.md)."""
    inputs = make_inputs(2, 37, 2, 8, 6, torch.bfloat16, seed=4)
    assert_close_to_reference(IMPLEMENTATIONS["chunked"], inputs, {"chunk_size": 16}, 1e-2)


def test_split_and_carry_equals_whole():
    """[0, 20) then [20, 37) from the first part's final state gives the whole row's result."""
    inputs = make_inputs(2, 37, 2, 8, 6, torch.float32, seed=31)
    ids = doc_ids_for("inside", 2, 37, 16)
    fn = IMPLEMENTATIONS["chunked"]
    h, final = fn(**inputs, doc_ids=ids, chunk_size=16, return_final_state=True)
    part = lambda sl: {n: inputs[n][:, sl] for n in INPUTS}
    h1, s1 = fn(**part(slice(0, 20)), initial_state=inputs["initial_state"], doc_ids=ids[:, :20], chunk_size=16,
                return_final_state=True)
    h2, s2 = fn(**part(slice(20, 37)), initial_state=s1, doc_ids=ids[:, 20:], chunk_size=16, return_final_state=True)
    torch.testing.assert_close(torch.cat([h1, h2], 1), h, rtol=1e-5, atol=1e-5)
    for a, b in zip(s2, final):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_step_decoding_equals_the_chunked_forward():
    """A prompt through the chunked form, then token by token through mlstm_step: the same h and state
    as the whole row at once."""
    inputs = make_inputs(2, 30, 2, 8, 6, torch.float32, seed=12)
    h, final = mlstm(**inputs, chunk_size=8, return_final_state=True, backend="chunked")
    _, state = mlstm(**{n: inputs[n][:, :20] for n in INPUTS}, initial_state=inputs["initial_state"], chunk_size=8,
                     return_final_state=True, backend="chunked")
    for t in range(20, 30):
        h_t, state = mlstm_step(*(inputs[n][:, t] for n in INPUTS), state)
        torch.testing.assert_close(h_t, h[:, t], rtol=1e-5, atol=1e-5)
    for a, b in zip(state, final):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_picks_and_forces_backends():
    inputs = make_inputs(1, 9, 2, 4, 4, torch.float32, seed=2)
    y = mlstm(**inputs, chunk_size=4)
    torch.testing.assert_close(y, IMPLEMENTATIONS["chunked"](**inputs, chunk_size=4))
    torch.testing.assert_close(mlstm(**inputs, backend="reference"), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        mlstm(**inputs, backend="cuda-magic")


def test_bad_shapes_name_the_argument():
    inputs = make_inputs(1, 9, 2, 4, 4, torch.float32, seed=2)
    C, n, m = inputs["initial_state"]
    with pytest.raises(ValueError, match="initial_state"):
        mlstm(**{**inputs, "initial_state": (C, n, m[:, :1])}, backend="chunked")
    with pytest.raises(ValueError, match="f must"):
        mlstm(**{**inputs, "f": inputs["f"][:, :3]}, backend="chunked")
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm(**inputs, chunk_size=0, backend="chunked")


def test_chunked_computes_in_float32_under_autocast():
    """Inside a bf16 autocast region (the trainer's CPU/GPU mixed precision) the chunked form keeps
    its float32 math: the same result as outside it, for the same (bf16) inputs."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 20, 2, 8, generator=gen).bfloat16() for _ in range(3))
    i, f = (torch.randn(2, 20, 2, generator=gen) for _ in range(2))
    plain = mlstm(q, k, v, i, f, chunk_size=8, backend="chunked")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mlstm(q, k, v, i, f, chunk_size=8, backend="chunked")
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, plain)
