"""ParaRNN's context-parallel Newton solve (kernels/pararnn/context.py) on the native passes (CPU,
float32) against the same CP solve on PyTorch's scans and against one process: outputs, final
state, residual and every gradient (u, a, p, the initial state) at cp 2, with documents ending
inside the slices and one starting at the second slice's first token, channels not a multiple of
the native block; converged, not converged (the same iterates) and with a tolerance. The ranks
are threads here (an all-gather over a barrier), so the check needs no process group; the real
group runs in tests/distributed/cp_pararnn.py."""

import threading
import warnings

import pytest
import torch

from tests.kernels.conftest import relative_error
from undertow.kernels import native
from undertow.kernels.pararnn import context, pararnn
from undertow.kernels.pararnn import native as pararnn_native

T, D, WORLD = 24, 70, 2  # D: one full native block of 64 channels and a partial one


class ThreadLinks:
    """`links` of kernels/context.SpanningSolve for ranks that are threads of one process."""

    def __init__(self, rank: int, board: dict):
        self.rank, self.world, self.board = rank, WORLD, board

    def all_gather(self, tensor: torch.Tensor) -> list:
        slots, barrier = self.board["slots"], self.board["barrier"]
        slots[self.rank] = tensor.detach().clone()
        barrier.wait()
        gathered = [s.clone() for s in slots]
        barrier.wait()  # everyone has read before the next call overwrites
        return gathered


def inputs(cell, scale):
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(2, T, 3, D, generator=gen)
    a = torch.randn(3, D, generator=gen) * scale
    p = torch.randn(2, D, generator=gen) * scale if cell == "lstm" else None
    init = [torch.randn(2, D, generator=gen) * 0.5 for _ in range(1 if cell == "gru" else 2)]
    ids = torch.zeros(2, T, dtype=torch.int64)
    ids[0, 5:] += 1
    ids[0, T // 2:] += 1  # a document starts at rank 1's first token
    ids[1, 15:] += 1
    cot = [torch.randn(2, T, D, generator=gen)] + [torch.randn(2, D, generator=gen) for _ in init]
    return u, a, p, init, ids, cot


def rank_run(rank, links, cell, u, a, p, init, ids, cot, newton, out):
    """This rank's slice through context.solve (with its autograd), as the CP handler would call it."""
    L = T // WORLD
    sl, last = slice(rank * L, (rank + 1) * L), rank == WORLD - 1
    leaves = [t.clone().requires_grad_() for t in [u, a] + ([] if p is None else [p]) + init]
    n = 3 if p is not None else 2
    state = leaves[n] if cell == "gru" else tuple(leaves[n:])
    kwargs = dict(initial_state=state, doc_ids=ids[:, sl], return_final_state=True, return_residual=True, **newton)
    y, final, residual = context.solve(links, (cell, leaves[0][:, sl], leaves[1], leaves[2] if p is not None else None),
                                       kwargs)
    final = (final,) if cell == "gru" else final
    loss = (y * cot[0][:, sl]).sum() + last * sum((f * c).sum() for f, c in zip(final, cot[1:]))
    loss.backward()
    out[rank] = (y.detach(), [f.detach() for f in final], residual.item(),
                 [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves])


def cp_run(enabled, cell, u, a, p, init, ids, cot, newton):
    """Every rank's slice in a thread -> (y (B, T, D), final state, residual per rank, gradients summed
    over the ranks as the data-parallel reduction would)."""
    previous, pararnn_native.ENABLED = pararnn_native.ENABLED, enabled
    board, out = {"slots": [None] * WORLD, "barrier": threading.Barrier(WORLD)}, [None] * WORLD
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            threads = [threading.Thread(target=rank_run, args=(r, ThreadLinks(r, board), cell, u, a, p, init, ids,
                                                               cot, newton, out)) for r in range(WORLD)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        pararnn_native.ENABLED = previous
    assert all(o is not None for o in out), "a rank failed (see the thread's traceback above)"
    y = torch.cat([o[0] for o in out], 1)
    grads = [sum(o[3][i] for o in out) for i in range(len(out[0][3]))]
    return y, out[-1][1], [o[2] for o in out], grads


def one_process(cell, u, a, p, init, ids, cot, newton):
    leaves = [t.clone().requires_grad_() for t in [u, a] + ([] if p is None else [p]) + init]
    n = 3 if p is not None else 2
    state = leaves[n] if cell == "gru" else tuple(leaves[n:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, final, residual = pararnn(cell, leaves[0], leaves[1], leaves[2] if p is not None else None,
                                     initial_state=state, doc_ids=ids, return_final_state=True, return_residual=True,
                                     backend="chunked", **newton)
    final = (final,) if cell == "gru" else final
    ((y * cot[0]).sum() + sum((f * c).sum() for f, c in zip(final, cot[1:]))).backward()
    return y.detach(), [f.detach() for f in final], residual.item(), [x.grad for x in leaves]


@pytest.fixture
def native_loop():
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler: the native loop cannot be built here")
    assert pararnn_native._library() is not None, native.unavailable_reason(pararnn_native.NAME)
    assert pararnn_native._backward_library() is not None, native.unavailable_reason(pararnn_native.BACKWARD_NAME)


@pytest.mark.parametrize("cell,scale,newton", [
    ("gru", 0.1, dict(iterations=3)),
    ("lstm", 0.1, dict(iterations=3)),
    ("gru", 2.0, dict(iterations=3)),                 # not converged: the same iterates
    ("lstm", 0.1, dict(iterations=6, tol=1e-6)),     # stops early, on both ranks at the same step
])
def test_cp_on_the_native_pass_equals_cp_on_pytorch_and_one_process(native_loop, cell, scale, newton):
    u, a, p, init, ids, cot = inputs(cell, scale)
    fast = cp_run(True, cell, u, a, p, init, ids, cot, dict(chunk_size=5, **newton))
    slow = cp_run(False, cell, u, a, p, init, ids, cot, dict(chunk_size=5, **newton))
    for (name, x), y in zip((("y", fast[0]), ("final", fast[1][-1])), (slow[0], slow[1][-1])):
        assert relative_error(x, y) <= 1e-5, name
    assert all(relative_error(f, s) <= 1e-5 for f, s in zip(fast[3], slow[3])), \
        [relative_error(f, s) for f, s in zip(fast[3], slow[3])]
    assert fast[2][0] == fast[2][1]  # the global residual, on every rank
    if scale == 2.0:
        assert slow[2][0] > 1e-2 and abs(fast[2][0] - slow[2][0]) <= 1e-4 * slow[2][0]
        return
    y, final, residual, grads = one_process(cell, u, a, p, init, ids, cot, dict(chunk_size=5, **newton))
    assert relative_error(fast[0], y) <= 1e-5 and relative_error(fast[1][-1], final[-1]) <= 1e-5
    assert all(relative_error(f, g) <= 1e-5 for f, g in zip(fast[3], grads)), \
        [relative_error(f, g) for f, g in zip(fast[3], grads)]
    assert fast[2][0] <= 1e-5 and residual <= 1e-5
