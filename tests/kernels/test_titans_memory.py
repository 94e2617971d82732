"""titans_memory: the chunked form against the token-by-token reference with the same chunk-start
rule (outputs, final weights/momentum/window and the gradient of every input, the initial state and
M_0 included), for linear and MLP memories, the Titans (l2, momentum, decay), Huber, Omega-window and
clipped rules, lengths that are not multiples of the chunk, documents inside and across chunks; the
exact token-by-token rule at chunk size 1; carried state; the NaN guard; recomputation."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.conftest import relative_error
from undertow.kernels.titans_memory import IMPLEMENTATIONS, MemoryState, UpdateRule, titans_memory
from undertow.kernels.titans_memory.chunked import titans_memory_chunked
from undertow.kernels.titans_memory.reference import start_state, titans_memory_reference

RULES = {
    "titans": UpdateRule(),
    "huber": UpdateRule(loss="huber", huber_delta=0.3),
    "omega": UpdateRule(window=3),
    "clipped": UpdateRule(max_grad_norm=0.5),  # the gradients here have norms ~1-4: clipping is active
    "sgd_no_decay": UpdateRule(optimizer="sgd", retention="none"),
}
GATES = ("theta", "eta", "alpha", "gamma")


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are tiny: one thread avoids OpenMP's barriers (which dominate on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def doc_ids_for(kind: str, B: int, T: int, chunk: int) -> torch.Tensor | None:
    """None; starts inside chunks ("inside"); or on a chunk's first/last tokens ("edges"). Row 1 has fewer."""
    if kind == "none":
        return None
    starts = {"inside": [2, chunk + 2], "edges": [chunk - 1, chunk, 2 * chunk]}[kind]
    ids = torch.zeros(B, T, dtype=torch.long)
    for row in range(B):
        for s in starts if row == 0 else starts[1:]:
            if 0 < s < T:
                ids[row, s:] += 1
    return ids


def make_inputs(B, T, H, D, depth, rule, *, seed, init=True):
    """Fresh float64 inputs (never zeros): unit-norm q, k; gates spread over (0, 1); a random carried state."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    gate = lambda lo, hi: lo + (hi - lo) * torch.rand(B, T, H, generator=gen, dtype=torch.float64)  # noqa: E731
    dims = [D] + [2 * D] * (depth - 1) + [D]
    inputs = {"q": F.normalize(rnd(B, T, H, D), dim=-1), "k": F.normalize(rnd(B, T, H, D), dim=-1),
              "v": rnd(B, T, H, D), "theta": gate(0.05, 0.6), "eta": gate(0.1, 0.95), "alpha": gate(0.0, 0.3),
              "gamma": gate(0.2, 1.0),
              "init_weights": tuple(0.4 * rnd(H, a, b) for a, b in zip(dims[:-1], dims[1:]))}
    if init:
        state = start_state(inputs["init_weights"], B, inputs["k"], inputs["v"], rule, torch.float64)
        window = None
        if state.window is not None:
            window = (F.normalize(rnd(*state.window[0].shape), dim=-1), rnd(*state.window[1].shape),
                      torch.rand(state.window[2].shape, generator=gen, dtype=torch.float64))
        inputs["initial_state"] = MemoryState(tuple(w + 0.2 * rnd(*w.shape) for w in state.weights),
                                              tuple(0.2 * rnd(*s.shape) for s in state.momentum), window)
    return inputs


def flat_state(state: MemoryState) -> list[torch.Tensor]:
    return [*state.weights, *state.momentum, *(state.window or ())]


def run(fn, inputs, kwargs, dtype, cotangents=None):
    """fn on fresh leaves of `dtype`; backpropagates fixed cotangents of y and of the final state.
    Returns y, the final state's tensors, {name: grad}, cotangents."""
    fresh = lambda t: t.detach().to(dtype).clone().requires_grad_()  # noqa: E731
    leaves = {}
    for name, value in inputs.items():
        if name == "init_weights":
            leaves[name] = tuple(fresh(w) for w in value)
        elif name == "initial_state":
            leaves[name] = MemoryState(*(None if part is None else tuple(fresh(t) for t in part)
                                         for part in value))
        else:
            leaves[name] = fresh(value)
    y, final = fn(**leaves, **kwargs, return_final_state=True)
    outs = [y, *flat_state(final)]
    if cotangents is None:
        gen = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in outs]
    sum((t.double() * c).sum() for t, c in zip(outs, cotangents)).backward()
    grads = {}
    for name, leaf in leaves.items():
        if name == "init_weights":
            grads.update({f"M_0 W{i}": w.grad for i, w in enumerate(leaf)})
        elif name == "initial_state":
            grads.update({f"initial {i}": t.grad for i, t in enumerate(flat_state(leaf))})
        else:
            grads[name] = leaf.grad
    return y, flat_state(final), grads, cotangents


def assert_close(fn, reference, inputs, kwargs, tol, dtype=torch.float32):
    """fn in `dtype` against the reference in float64: every output, state and gradient within tol."""
    y_ref, f_ref, g_ref, cot = run(reference, inputs, kwargs, torch.float64)
    y, f, g, _ = run(fn, inputs, kwargs, dtype, cot)
    errors = {"y": relative_error(y, y_ref)}
    errors.update({f"final {i}": relative_error(a, b) for i, (a, b) in enumerate(zip(f, f_ref))})
    for name, grad in g_ref.items():
        if grad is None:  # an input the rule does not read (eta under sgd, alpha without retention)
            assert g[name] is None, f"{name} has a gradient but does not reach the reference's outputs"
            continue
        if g[name] is None:  # M_0 unread without document starts: the reference's gradient is zero
            assert not grad.any(), f"no gradient for {name}"
            continue
        errors[f"grad {name}"] = relative_error(g[name], grad)
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


@pytest.mark.parametrize("docs", ["none", "inside", "edges"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("depth", [1, 2])
def test_chunked_matches_reference(depth, rule, docs):
    """T = 11 over chunks of 4 (the last one short); every input's gradient, the initial state's included."""
    B, T, H, D, C = 2, 11, 2, 4, 4
    inputs = make_inputs(B, T, H, D, depth, RULES[rule], seed=depth * 100 + len(rule))
    kwargs = dict(rule=RULES[rule], chunk_size=C, doc_ids=doc_ids_for(docs, B, T, C))
    assert_close(titans_memory_chunked, titans_memory_reference, inputs, kwargs, 1e-5)


@pytest.mark.parametrize("depth", [1, 3])
def test_chunk_one_is_the_token_by_token_rule(depth):
    """Chunk size 1 equals the paper's exact rule (gradient at W_{t-1}); a larger chunk does not."""
    B, T, H, D = 2, 9, 2, 4
    inputs = make_inputs(B, T, H, D, depth, RULES["titans"], seed=7)
    docs = doc_ids_for("inside", B, T, 4)
    exact = lambda chunk_size, **kw: titans_memory_reference(**kw, chunk_size=None)  # noqa: E731
    assert_close(titans_memory_chunked, exact, inputs, dict(chunk_size=1, doc_ids=docs), 1e-5)
    y_exact = titans_memory_reference(**inputs, doc_ids=docs)
    y_chunk = titans_memory_chunked(**inputs, chunk_size=4, doc_ids=docs)
    assert relative_error(y_chunk, y_exact) > 1e-3


@pytest.mark.parametrize("rule", ["titans", "omega"])
def test_state_carries_across_calls(rule):
    """Two calls, the second from the first's final state, equal one call over the whole row (the split
    falls inside a chunk, the rule's window reaches across it); also the public dispatch."""
    B, T, H, D, C, split = 2, 13, 2, 4, 4, 7
    inputs = make_inputs(B, T, H, D, 2, RULES[rule], seed=3)
    docs = doc_ids_for("inside", B, T, C)
    kw = dict(rule=RULES[rule], chunk_size=C)
    y, final = titans_memory(**inputs, doc_ids=docs, return_final_state=True, **kw)
    # the carried run restarts its chunks at the split: compare against the reference doing the same
    first = {k: (v[:, :split] if torch.is_tensor(v) else v) for k, v in inputs.items()}
    second = {k: (v[:, split:] if torch.is_tensor(v) else v) for k, v in inputs.items() if k != "initial_state"}
    y1, s1 = titans_memory(**first, doc_ids=docs[:, :split], return_final_state=True, **kw)
    y2, s2 = titans_memory(**second, initial_state=s1, doc_ids=docs[:, split:], return_final_state=True, **kw)
    r1, rs1 = titans_memory_reference(**first, doc_ids=docs[:, :split], return_final_state=True, **kw)
    r2, rs2 = titans_memory_reference(**second, initial_state=rs1, doc_ids=docs[:, split:], return_final_state=True,
                                      **kw)
    assert relative_error(torch.cat([y1, y2], 1), torch.cat([r1, r2], 1)) <= 1e-10
    for a, b in zip(flat_state(s2), flat_state(rs2)):
        assert relative_error(a, b) <= 1e-10
    # at chunk size 1 the split changes nothing: one run over the whole row
    y_full = titans_memory(**inputs, doc_ids=docs, rule=RULES[rule], chunk_size=1)
    y1, s1 = titans_memory(**first, doc_ids=docs[:, :split], return_final_state=True, rule=RULES[rule], chunk_size=1)
    y2 = titans_memory(**second, initial_state=s1, doc_ids=docs[:, split:], rule=RULES[rule], chunk_size=1)
    assert relative_error(torch.cat([y1, y2], 1), y_full) <= 1e-10
    assert y.shape == (B, T, H, D) and len(final.weights) == 2


@pytest.mark.parametrize("impl", ["reference", "chunked"])  # the Triton form's: test_titans_triton.py (depth 1)
def test_nan_guard_skips_a_poisoned_token(impl):
    """A token whose target is NaN contributes no update: the same as that token with theta = 0."""
    B, T, H, D = 1, 10, 2, 4
    inputs = make_inputs(B, T, H, D, 2, RULES["titans"], seed=5, init=False)
    inputs.pop("gamma")
    poisoned = dict(inputs, v=inputs["v"].clone())
    poisoned["v"][0, 4] = float("nan")
    skipped = dict(inputs, theta=inputs["theta"].clone())
    skipped["theta"][0, 4] = 0.0
    fn = IMPLEMENTATIONS[impl]
    y = fn(**poisoned, chunk_size=4)
    assert torch.isfinite(y).all()
    assert relative_error(y, fn(**skipped, chunk_size=4)) <= 1e-12


def test_recompute_gives_the_same_gradients_and_saves_less():
    """recompute=True (chunks checkpointed) gives the same gradients; what autograd keeps between the
    forward and the backward is the inputs and one state per chunk, no per-token memory weights. The
    last chunk is short (60 = 7 x 8 + 4): each chunk is recomputed with its own length."""
    B, T, H, D = 1, 60, 2, 8
    inputs = make_inputs(B, T, H, D, 2, RULES["titans"], seed=9, init=False)
    inputs["theta"] = 0.3 * inputs["theta"]  # a stable inner step over 60 tokens (the gradients stay finite)

    def saved_bytes_and_grads(recompute):
        leaves = {k: (tuple(w.float().requires_grad_() for w in v) if k == "init_weights" else
                      v.float().requires_grad_()) for k, v in inputs.items()}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            y = titans_memory_chunked(**leaves, chunk_size=8, recompute=recompute)
        y.square().sum().backward()
        return sum(saved), [leaves[name].grad for name in ("q", "k", "v", *GATES)] + [
            w.grad for w in leaves["init_weights"]]

    full, g_full = saved_bytes_and_grads(False)
    light, g_light = saved_bytes_and_grads(True)
    for a, b in zip(g_light, g_full):
        assert relative_error(a, b) <= 1e-6
    assert light < full / 3


def test_bad_inputs_are_refused():
    inputs = make_inputs(1, 5, 2, 4, 2, RULES["titans"], seed=1, init=False)
    with pytest.raises(ValueError, match="theta"):
        titans_memory(**dict(inputs, theta=inputs["theta"][:, :3]))
    with pytest.raises(ValueError, match="Dk = Dv"):
        titans_memory(**dict(inputs, v=inputs["v"][..., :3]))
    with pytest.raises(ValueError, match="window"):
        UpdateRule(window=0)
    with pytest.raises(ValueError, match="loss"):
        UpdateRule(loss="l3")
