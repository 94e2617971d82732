"""Single-process checks of context parallelism's state passing: the declared transitions and
final states of each recurrence op, and the fold that turns per-slice results into the full scan."""

import pytest
import torch

from undertow.kernels.causal_conv1d import causal_conv1d
from undertow.kernels.selective_scan import selective_scan
from undertow.kernels.ssd import ssd
from undertow.kernels.causal_conv1d.context import STATE_PASSING as CONV_STATE
from undertow.kernels.selective_scan.context import STATE_PASSING as SCAN_STATE
from undertow.kernels.ssd.context import STATE_PASSING as SSD_STATE
from undertow.parallel.context_state import (
    continues,
    doc_edges,
    fold_backward,
    fold_forward,
)

STATE_PASSING = {"ssd": SSD_STATE, "selective_scan": SCAN_STATE, "causal_conv1d": CONV_STATE}
T = 24
# Row 0: boundaries inside slices (5, 20 with 4 slices of 6; 5 with 2 of 12), at a slice start
# (12) and a document spanning whole slices; row 1: one document.
DOC_ROW = [0] * 5 + [1] * 7 + [2] * 8 + [3] * 4


def doc_ids(rows: int = 2) -> torch.Tensor:
    ids = torch.zeros(rows, T, dtype=torch.int32)
    ids[0] = torch.tensor(DOC_ROW)
    return ids


def make_op(name: str, gen: torch.Generator):
    """(fn, args, kwargs, state shape) of op `name` on fresh random float32 inputs."""
    r = lambda *s: torch.randn(*s, generator=gen)
    Bt = 2
    if name == "ssd":
        H, P, G, N = 4, 3, 2, 5
        args = (r(Bt, T, H, P), r(Bt, T, H), -torch.rand(H, generator=gen) - 0.5, r(Bt, T, G, N), r(Bt, T, G, N))
        return ssd, args, {"D": r(H), "dt_bias": r(H) * 0.1, "chunk_size": 4}, (Bt, H, P, N)
    if name == "selective_scan":
        Dc, N = 6, 4
        args = (r(Bt, T, Dc), r(Bt, T, Dc), -torch.rand(Dc, N, generator=gen) - 0.5, r(Bt, T, N), r(Bt, T, N))
        return selective_scan, args, {"D": r(Dc), "z": r(Bt, T, Dc), "delta_bias": r(Dc) * 0.1}, (Bt, Dc, N)
    Dc, K = 5, 4
    return causal_conv1d, (r(Bt, T, Dc), r(Dc, K), r(Dc)), {"activation": "silu"}, (Bt, Dc, K - 1)


def piece(args, kwargs, sl: slice, ids):
    """The op's inputs restricted to tokens `sl` (time is dim 1 of every (Bt, T, ...) input)."""
    cut = tuple(a[:, sl] if a.dim() >= 2 and a.shape[:2] == args[0].shape[:2] else a for a in args)
    local = {k: (v[:, sl] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == args[0].shape[:2] else v)
             for k, v in kwargs.items()}
    return cut, {**local, "doc_ids": ids[:, sl] if ids is not None else None}


@pytest.mark.parametrize("name", ["ssd", "selective_scan", "causal_conv1d"])
@pytest.mark.parametrize("with_docs", [True, False])
def test_declared_final_state_and_transition_match_the_kernel(name, with_docs):
    gen = torch.Generator().manual_seed(1)
    fn, args, kwargs, state_shape = make_op(name, gen)
    spec = STATE_PASSING[name]
    ids = doc_ids() if with_docs else None
    for sl in (slice(0, 6), slice(6, 12), slice(12, 24)):  # inside, without and at a boundary
        a, kw = piece(args, kwargs, sl, ids)
        _, zero_final = fn(*a, **kw, return_final_state=True)
        h0 = torch.randn(state_shape, generator=gen)
        _, h0_final = fn(*a, **kw, initial_state=h0, return_final_state=True)
        transition = spec.transition(a, kw)
        if spec.final_from_zero is not None:
            torch.testing.assert_close(spec.final_from_zero(fn, a, kw), zero_final, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(transition * h0 + zero_final, h0_final, rtol=1e-5, atol=1e-5)
    if with_docs and name != "causal_conv1d":  # a boundary inside the slice stops the carried state
        assert (spec.transition(*piece(args, kwargs, slice(0, 6), ids))[0] == 0).all()


def simulate_ranks(fn, spec, args, kwargs, ids, world, initial):
    """Every rank's (y, final) from context_state's fold, in one process."""
    length = T // world
    slices = [piece(args, kwargs, slice(r * length, (r + 1) * length), ids) for r in range(world)]
    finals, transitions, edges = [], [], []
    for rank, (a, kw) in enumerate(slices):
        final = fn(*a, **kw, return_final_state=True)[1]
        transition = spec.transition(a, kw)
        if rank == 0:
            final = final + transition * initial
        finals.append(final)
        transitions.append(transition.expand_as(final) if transition.dim() == final.dim() else transition)
        edges.append(doc_edges(kw["doc_ids"], final.shape[0], final.device))
    keep = continues(edges, finals[0].dim())
    outs = []
    for rank, (a, kw) in enumerate(slices):
        start = fold_forward(finals, transitions, keep, rank)[0] + (initial if rank == 0 else 0)
        outs.append(fn(*a, **kw, initial_state=start, return_final_state=True))
    return outs


@pytest.mark.parametrize("name", ["ssd", "selective_scan", "causal_conv1d"])
@pytest.mark.parametrize("world", [2, 4])
def test_slices_folded_reproduce_the_full_scan(name, world):
    gen = torch.Generator().manual_seed(2)
    fn, args, kwargs, state_shape = make_op(name, gen)
    ids = doc_ids()
    initial = torch.randn(state_shape, generator=gen)
    y_full, final_full = fn(*args, **kwargs, doc_ids=ids, initial_state=initial, return_final_state=True)
    outs = simulate_ranks(fn, STATE_PASSING[name], args, kwargs, ids, world, initial)
    torch.testing.assert_close(torch.cat([y for y, _ in outs], dim=1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[-1][1], final_full, rtol=1e-5, atol=1e-5)


def test_document_ids_travel_exactly():
    ids = torch.tensor([[5, 2**31 - 1], [2**24 + 1, 2**24 + 1], [2143289344, 2143289344]], dtype=torch.int32)
    prev = doc_edges(torch.tensor([[0, 5], [0, 2**24], [0, 2143289344]]), 3, "cpu")
    keep = continues([prev, doc_edges(ids, 3, "cpu")], 2)[1]
    assert keep.flatten().tolist() == [1.0, 0.0, 1.0]  # 2**24 + 1 is not 2**24; a NaN bit pattern equals itself


def test_fold_backward_is_the_adjoint_of_fold_forward():
    gen = torch.Generator().manual_seed(3)
    world, shape = 4, (3, 2, 5)
    finals = [torch.randn(shape, generator=gen, requires_grad=True) for _ in range(world)]
    transitions = [torch.rand(3, 2, 1, generator=gen, requires_grad=True) for _ in range(world)]
    edges = [doc_edges(torch.tensor([[0, 0], [1, 1], [2, 3]]), 3, "cpu") for _ in range(world)]
    edges[2] = doc_edges(torch.tensor([[0, 0], [7, 7], [3, 3]]), 3, "cpu")  # row 1 starts a document at rank 2
    keep = continues(edges, len(shape))
    weights = [torch.randn(shape, generator=gen) for _ in range(world)]
    results = [fold_forward(finals, transitions, keep, r) for r in range(world)]
    sum((w * init).sum() for w, (init, _) in zip(weights, results)).backward()
    grad = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)
    for rank in range(world):
        grad_out = fold_backward(weights, [t.detach() for t in transitions], keep, rank)
        torch.testing.assert_close(grad_out, grad(finals[rank]))
        if rank > 0:
            out_prev = results[rank][1].detach()
            grad_t = (grad_out * keep[rank] * out_prev).sum_to_size(transitions[rank].shape)
            torch.testing.assert_close(grad_t, grad(transitions[rank]))
    assert finals[0].grad.abs().sum() > 0 and transitions[1].grad.abs().sum() > 0


# ---- the mLSTM: a state affine only in log space, folded by StatePassing.combine ----------------------

from undertow.kernels.mlstm import mlstm  # noqa: E402
from undertow.kernels.mlstm.context import STATE_PASSING as MLSTM_STATE  # noqa: E402
from undertow.parallel.context_state import fold_combined, fold_combined_vjp  # noqa: E402


def mlstm_inputs(gen: torch.Generator, dtype=torch.float64):
    """(q, k, v, i, f) for T tokens, 3 heads, and an initial state. Row 1 (one document): open input
    gates (i~ ~ 8) and weak forgetting early, closed ones (i~ ~ -10) late, so the carried m wins at
    later ranks; row 0 the reverse, so each slice's own max wins: the max moves across ranks both ways."""
    B, H, Dqk, Dv = 2, 3, 4, 5
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    i = r(B, T, H)
    i[1, : T // 2] += 8
    i[1, T // 2:] -= 10
    i[0, : T // 2] -= 10
    i[0, T // 2:] += 8
    f = 3 + r(B, T, H)
    args = tuple(x.to(dtype) for x in (r(B, T, H, Dqk), r(B, T, H, Dqk), r(B, T, H, Dv), i, f))
    initial = tuple(x.to(dtype) for x in (r(B, H, Dqk, Dv), r(B, H, Dqk), 2 * r(B, H)))
    return args, initial


def mlstm_piece(args, sl, ids):
    return tuple(a[:, sl] for a in args), {"doc_ids": ids[:, sl] if ids is not None else None, "chunk_size": 4}


@pytest.mark.parametrize("with_docs", [True, False])
def test_mlstm_declared_final_and_combine_match_the_kernel(with_docs):
    gen = torch.Generator().manual_seed(4)
    args, initial = mlstm_inputs(gen)
    ids = doc_ids() if with_docs else None
    for sl in (slice(0, 6), slice(6, 12), slice(12, 24)):  # inside, without and at a boundary
        a, kw = mlstm_piece(args, sl, ids)
        own, transition = MLSTM_STATE.final_from_zero(mlstm, a, kw), MLSTM_STATE.transition(a, kw)
        for start in (initial, tuple(torch.zeros_like(x) for x in initial)):  # the zero state: not combine's identity
            want = mlstm(*a, **kw, initial_state=start if start is initial else None, return_final_state=True)[1]
            for got, ref in zip(MLSTM_STATE.combine(start, own, transition), want):
                torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    if with_docs:  # a boundary inside the slice stops the carried state
        assert torch.isneginf(MLSTM_STATE.transition(*mlstm_piece(args, slice(0, 6), ids))[0]).all()


def simulate_mlstm_ranks(args, ids, world, initial):
    """h and final state of every rank through fold_combined, in one process, differentiable."""
    length = T // world
    slices = [mlstm_piece(args, slice(r * length, (r + 1) * length), ids) for r in range(world)]
    finals, transitions, edges = [], [], []
    for rank, (a, kw) in enumerate(slices):
        final, transition = MLSTM_STATE.final_from_zero(mlstm, a, kw), MLSTM_STATE.transition(a, kw)
        if rank == 0:
            final = MLSTM_STATE.combine(initial, final, transition)
        finals.append(final)
        transitions.append(transition)
        edges.append(doc_edges(kw["doc_ids"], final[0].shape[0], final[0].device))
    starts = fold_combined(finals, transitions, continues(edges, 1), MLSTM_STATE.combine)
    starts[0] = initial
    outs = [mlstm(*a, **kw, initial_state=start, return_final_state=True) for (a, kw), start in zip(slices, starts)]
    return torch.cat([h for h, _ in outs], dim=1), outs[-1][1], finals, transitions


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-3)], ids=["float64", "float32"])
def test_mlstm_slices_folded_reproduce_the_full_scan(world, dtype, tol):
    """Outputs, final (C, n, m) and the gradients of every input and of the initial state. The open
    input gates make h = C^T q / |n^T q| ill-conditioned (float64 rounding grows 1e-16 -> 1e-13 in h
    and the gradients), so float32 agrees to ~1.5e-4 only; float64 shows the fold is exact."""
    gen = torch.Generator().manual_seed(5)
    args, initial = mlstm_inputs(gen, dtype)
    ids = doc_ids()
    results = []
    for simulate in (False, True):
        leaves = [x.clone().requires_grad_() for x in (*args, *initial)]
        a, init = tuple(leaves[:5]), tuple(leaves[5:])
        if simulate:
            h, final, finals, transitions = simulate_mlstm_ranks(a, ids, world, init)
        else:
            h, final = mlstm(*a, doc_ids=ids, chunk_size=4, initial_state=init, return_final_state=True)
        cot = torch.Generator().manual_seed(0)
        loss = sum((x * torch.randn(x.shape, generator=cot, dtype=dtype)).sum() for x in (h, *final))
        loss.backward()
        results.append([h, *final] + [x.grad for x in leaves])
    for got, want in zip(*results):
        assert ((got - want).norm() / want.norm()).item() <= tol
    # the max moved across ranks both ways: the carried term wins in some rows, the slice's own in others
    carried = torch.stack([(finals[j - 1][2] + transitions[j] > finals[j][2]) for j in range(1, world)])
    assert carried.any() and (~carried).any()


def test_mlstm_fold_vjp_is_autograd_of_the_fold():
    gen = torch.Generator().manual_seed(6)
    world, B, H = 4, 3, 2
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    finals = [tuple(x.requires_grad_() for x in (r(B, H, 4, 5), r(B, H, 4), 3 * r(B, H))) for _ in range(world)]
    transitions = [(-torch.rand(B, H, generator=gen, dtype=torch.float64) * 4).requires_grad_() for _ in range(world)]
    with torch.no_grad():
        transitions[2][1] = float("-inf")  # row 1 restarts a document inside rank 2's slice
    edges = [doc_edges(torch.tensor([[0, 0], [1, 1], [2, 3]]), B, "cpu") for _ in range(world)]
    edges[3] = doc_edges(torch.tensor([[5, 5], [1, 1], [3, 3]]), B, "cpu")  # row 0 starts a document at rank 3
    keep = continues(edges, 1)
    grads = [tuple(r(*x.shape) for x in finals[0]) for _ in range(world)]
    initials = fold_combined(finals, transitions, keep, MLSTM_STATE.combine)
    sum((g * x).sum() for s in range(world) for g, x in zip(grads[s], initials[s])).backward()
    detached = [tuple(x.detach() for x in f) for f in finals]
    for rank in range(world):
        *d_final, d_transition = fold_combined_vjp(grads, detached, [t.detach() for t in transitions], keep,
                                                   MLSTM_STATE.combine, rank)
        for got, leaf in zip((*d_final, d_transition), (*finals[rank], transitions[rank])):
            want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            torch.testing.assert_close(got, want)
    assert all(torch.isfinite(x.grad).all() for x in finals[0])
