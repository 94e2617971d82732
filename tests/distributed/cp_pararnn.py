"""Context parallelism of ParaRNN's Newton solve (its linear systems span the ranks,
kernels/pararnn/context.py): outputs, final state, residual and every gradient (u, a, p, the
initial state) equal the one-process solve at cp = 2 and 4 (inside test_context_parallel.py's
spawns), on rows whose documents end inside slices, at a slice start and span whole slices; where
3 iterations converge (also equal to the reference loop), where they do not (the same iterates,
the same large residual on every rank) and with a tolerance (the same early stop on every rank)."""

import warnings

import torch
import torch.distributed as dist

from undertow.kernels.context import active
from undertow.kernels.pararnn import pararnn
from undertow.parallel.context import ContextParallel
from undertow.parallel.context_comm import COUNTER

T, D = 32, 4
DOCS = [(0, 5), (5, 16), (16, 29), (29, 32)]  # 16 is a slice start at cp 2 and 4
CASES = [  # (cell, dtype, recurrent weights' scale, iterations, tol)
    ("gru", torch.float64, 0.1, 3, None),
    ("lstm", torch.float64, 0.1, 3, None),
    ("lstm", torch.float32, 0.1, 3, None),
    ("gru", torch.float64, 2.0, 3, None),      # not converged: the same iterates as one process
    ("lstm", torch.float64, 2.0, 40, 1e-9),    # stops early, on every rank at the same step
]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(cell, dtype, scale, rows=2):
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(rows, T, 3, D, generator=gen, dtype=torch.float64)
    a = torch.randn(3, D, generator=gen, dtype=torch.float64) * scale
    p = torch.randn(2, D, generator=gen, dtype=torch.float64) * scale if cell == "lstm" else None
    init = [torch.randn(rows, D, generator=gen, dtype=torch.float64) for _ in range(1 if cell == "gru" else 2)]
    ids = torch.zeros(rows, T, dtype=torch.int32)
    for d, (start, end) in enumerate(DOCS):
        ids[0, start:end] = d
    ids[1, 11:] = 1  # row 1: one boundary inside rank 1's slice at cp 4, rank 0's at cp 2
    cot = [torch.randn(rows, T, D, generator=gen, dtype=torch.float64)] + \
          [torch.randn(rows, D, generator=gen, dtype=torch.float64) for _ in init]
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(u), cast(a), cast(p), [cast(s) for s in init], ids, cot


def run(cell, u, a, p, init, ids, cot, sl, last: bool, **newton):
    leaves = [u.clone().requires_grad_(), a.clone().requires_grad_()] + ([] if p is None else [p.clone().requires_grad_()])
    s0 = [s.clone().requires_grad_() for s in init]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-converged case warns on every rank, as one process does
        y, final, residual = pararnn(cell, leaves[0][:, sl], leaves[1], leaves[2] if p is not None else None,
                                     initial_state=s0[0] if cell == "gru" else tuple(s0), doc_ids=ids[:, sl],
                                     return_final_state=True, return_residual=True, backend="chunked", **newton)
    final = (final,) if cell == "gru" else final
    loss = (y.double() * cot[0][:, sl]).sum() + last * sum((f.double() * c).sum() for f, c in zip(final, cot[1:]))
    loss.backward()
    grads = [x.grad for x in leaves] + [s.grad if s.grad is not None else torch.zeros_like(s) for s in s0]
    return y.detach(), [f.detach() for f in final], residual.item(), grads


def check(rank, world):
    cp = ContextParallel(dist.group.WORLD)
    length = T // world
    sl, last = slice(rank * length, (rank + 1) * length), rank == world - 1
    results = []
    for cell, dtype, scale, iterations, tol in CASES:
        u, a, p, init, ids, cot = inputs(cell, dtype, scale)
        newton = dict(iterations=iterations, tol=tol, chunk_size=3)  # chunks of 3: not dividing a slice
        y_full, final_full, res_full, grads_full = run(cell, u, a, p, init, ids, cot, slice(None), True, **newton)
        COUNTER.reset()
        with active(cp):
            y, final, res, grads = run(cell, u, a, p, init, ids, cot, sl, last, **newton)
        messages = dict(COUNTER.calls)
        for g in grads:  # each rank holds its slice's part of every gradient: the sum is the whole
            dist.all_reduce(g)
        results.append({"case": (cell, str(dtype), scale, iterations, tol), "y": rel(y, y_full[:, sl]),
                        "final": max(rel(x, f) for x, f in zip(final, final_full)) if last else 0.0,
                        "residual": (res, res_full), "messages": messages, "grads": [rel(x, g) for x, g in zip(grads, grads_full)]})
    return results


def assert_matches(results):
    """results: every rank's `check`."""
    for rank, cases in enumerate(results):
        for res in cases:
            tol = 1e-5 if "float32" in res["case"][1] else 1e-10
            assert res["y"] < tol and res["final"] < tol, (rank, res)
            assert max(res["grads"]) < tol, (rank, res)
            ours, full = res["residual"]
            assert abs(ours - full) <= tol * max(full, 1.0), (rank, res)  # the global max, on every rank
            if res["case"][4] is None:  # C0, one per iteration, C3 forward; one backward (the module's docstring)
                assert res["messages"] == {"all_gather": res["case"][3] + 3}, (rank, res)
            if res["case"][2] == 2.0 and res["case"][3] == 3:
                assert ours > 1e-2, (rank, res)  # the case meant not to converge does not
