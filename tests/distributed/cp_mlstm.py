"""The mLSTM under context parallelism in a gloo process group (run inside test_context_parallel.py's
spawns, cp = 2 and 4) against the single-process run: h on every rank, the final (C, n, m) on the last, the gradients of every input
and of the initial state; documents inside slices, at a slice start and across slices, and a max
that moves across ranks (open input gates in one half of a row, closed ones in the other)."""

import torch
import torch.distributed as dist

from undertow.kernels.context import active
from undertow.kernels.mlstm import mlstm
from undertow.parallel.context import ContextParallel
from undertow.parallel.context_comm import COUNTER

T = 32  # 8 tokens a rank at cp 4: boundaries at 5 and 29 inside slices, 16 at a slice start
DOCS = [(0, 5), (5, 16), (16, 29), (29, 32)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(rows: int = 3):
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen)
    H, Dqk, Dv = 2, 4, 6
    i, f = r(rows, T, H), 3 + r(rows, T, H)
    i[1, : T // 2] -= 10  # closed early, open late: each slice's own max wins
    i[2, T // 2:] -= 10  # open early, closed late: the carried max wins at later ranks
    ids = torch.zeros(rows, T, dtype=torch.int32)
    for d, (start, end) in enumerate(DOCS):
        ids[0, start:end] = d
    args = (r(rows, T, H, Dqk), r(rows, T, H, Dqk), r(rows, T, H, Dv), i, f)
    return args, ids, (r(rows, H, Dqk, Dv), r(rows, H, Dqk), 2 * r(rows, H))


def _run(args, ids, initial, sl, cotangents):
    leaves = [a.clone().requires_grad_() for a in (*args, *initial)]
    h, final = mlstm(*(a[:, sl] for a in leaves[:5]), doc_ids=ids[:, sl], chunk_size=4,
                     initial_state=tuple(leaves[5:]), return_final_state=True)
    cot_h, *cot_final = cotangents
    ((h * cot_h[:, sl]).sum() + sum((s * c).sum() for s, c in zip(final, cot_final))).backward()
    # the initial state is read on cp rank 0 only: no gradient elsewhere
    return h.detach(), [s.detach() for s in final], [a.grad if a.grad is not None else torch.zeros_like(a) for a in leaves]


def check(rank, world):
    args, ids, initial = _inputs()
    gen = torch.Generator().manual_seed(4)
    h_ref, final_ref = mlstm(*args, doc_ids=ids, initial_state=initial, return_final_state=True)
    cotangents = [torch.randn(t.shape, generator=gen) for t in (h_ref, *final_ref)]
    h_full, final_full, grads_full = _run(args, ids, initial, slice(None), cotangents)
    length = T // world
    sl = slice(rank * length, (rank + 1) * length)
    last = rank == world - 1
    COUNTER.reset()
    with active(ContextParallel(dist.group.WORLD)):
        h, final, grads = _run(args, ids, initial, sl, [cotangents[0]] + [c * last for c in cotangents[1:]])
    calls = dict(COUNTER.calls)
    for g in grads:  # each rank holds its slice's part: the sum over ranks is the full gradient
        dist.all_reduce(g)
    return {"h": rel(h, h_full[:, sl]), "final": [rel(a, b) for a, b in zip(final, final_full)] if last else [0.0],
            "grads": [rel(g, gf) for g, gf in zip(grads, grads_full)], "calls": calls}


def assert_matches(results):
    """results: every rank's `check`."""
    for rank, res in enumerate(results):
        assert res["h"] < 1e-5 and max(res["final"]) < 1e-5, (rank, res)
        assert max(res["grads"]) < 1e-4, (rank, res)
        assert res["calls"] == {"all_gather": 2}, (rank, res["calls"])  # states forward, their gradients backward
