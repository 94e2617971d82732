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
