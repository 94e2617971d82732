"""Context parallelism by serial state passing (sLSTM, whose state does not compose): the slices
run rank after rank and give the full scan's outputs, final state and every gradient (gates, R,
the initial state), at cp = 2 and 4 (inside test_context_parallel.py's spawns), on rows whose
documents end inside slices, at a slice start and span whole slices."""

import torch
import torch.distributed as dist

from undertow.kernels.context import active
from undertow.kernels.slstm import slstm
from undertow.parallel.context import ContextParallel

T, H, D = 32, 2, 4
DOCS = [(0, 5), (5, 16), (16, 29), (29, 32)]  # 16 is a slice start at cp 2 and 4


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(rows=2):
    gen = torch.Generator().manual_seed(5)
    gates = torch.randn(rows, T, 4, H, D, generator=gen)
    gates[:, :, 1] += 2.0
    R = torch.randn(4, H, D, D, generator=gen) / 2
    init = (torch.randn(rows, H, D, generator=gen), torch.randn(rows, H, D, generator=gen),
            torch.rand(rows, H, D, generator=gen) + 0.5, torch.randn(rows, H, D, generator=gen))
    ids = torch.zeros(rows, T, dtype=torch.int32)
    for d, (start, end) in enumerate(DOCS):
        ids[0, start:end] = d
    cot = [torch.randn(rows, T, H, D, generator=gen)] + [torch.randn(rows, H, D, generator=gen) for _ in range(3)]
    return gates, R, init, ids, cot


def run(gates, R, init, ids, cot, sl, last: bool):
    g, r = gates.clone().requires_grad_(), R.clone().requires_grad_()
    s0 = tuple(s.clone().requires_grad_() for s in init)
    y, final = slstm(g[:, sl], r, initial_state=s0, doc_ids=ids[:, sl], return_final_state=True)
    loss = (y * cot[0][:, sl]).sum() + last * sum((f * c).sum() for f, c in zip(final[:3], cot[1:]))
    loss.backward()
    init_grads = [s.grad if s.grad is not None else torch.zeros_like(s) for s in s0]
    return y.detach(), [f.detach() for f in final], [g.grad, r.grad, *init_grads]


def check(rank, world):
    gates, R, init, ids, cot = inputs()
    y_full, final_full, grads_full = run(gates, R, init, ids, cot, slice(None), True)
    cp = ContextParallel(dist.group.WORLD)
    length = T // world
    sl = slice(rank * length, (rank + 1) * length)
    last = rank == world - 1
    with active(cp):
        y, final, grads = run(gates, R, init, ids, cot, sl, last)
    for g in grads:  # each rank holds its slice's part of every gradient: the sum is the whole
        dist.all_reduce(g)
    return {"y": rel(y, y_full[:, sl]), "final": max(rel(a, b) for a, b in zip(final, final_full)) if last else 0.0,
            "grads": [rel(a, b) for a, b in zip(grads, grads_full)]}


def assert_matches(results):
    """results: every rank's `check`."""
    for rank, res in enumerate(results):
        assert res["y"] < 1e-5 and res["final"] < 1e-5, (rank, res)
        assert max(res["grads"]) < 1e-5, (rank, res["grads"])
