"""Context parallelism (CP) for ParaRNN's Newton solver: every Newton step's linear system spans the
cp ranks, so the ranks solve the whole split sequence together and get the one-process iterates.

Rank r holds tokens [r T/cp, (r+1) T/cp) of every row. Newton (newton.py, eqs. N0-N2) needs, per
step, the state before the slice's first token (the residual at token 0 reads it) and the linear
recurrence delta_t = J_t delta_{t-1} + r_t over the whole row. Both come from one all-gather:

  guess     s_t = f(0, u_t) locally; all-gather (last state, first/last document id)       (C0)
  step      prev_0 = the state after rank r-1's slice (zero where a document starts at token 0);
            r_t, J_t local; the slice's own solution x~ from a zero carry and its cumulative
            transitions P_t = J_t ... J_0 (scan.py); all-gather (max |r|, P_{L-1}, x~_{L-1},
            last state)                                                                      (C1)
            fold:  out_{-1} = 0, out_j = P^j_{L-1} out_{j-1} + x~^j_{L-1} (delta after rank j),
            carry_r = out_{r-1}; delta_t = x~_t + P_t carry_r; s += delta; rank r-1's new last
            state = its old one + out_{r-1}, known to every rank without another message    (C2)
  residual  max |F| over the ranks: the gathered maxima (C1) decide `tol` on every rank alike;
            after the last step one more all-gather of one number per rank                  (C3)

The slices' work: on CPU in float32 the native pass (native.py: one C++ sweep per Newton step
for r, J, x~ and P, native_pararnn.cpp's pararnn_cp_step; the backward's two reverse passes below
by pararnn_bwd); else scan.py's chunked PyTorch form, or triton.py's kernels on CUDA (float32).
Messages: iterations + 2 all-gathers per forward, each rank sending B*S*(S+2)*D + 1 numbers per
step (S = 1 GRU, 2 LSTM) — the state-passing ops' traffic, once per Newton step. Compute per
step: S + 1 scans of the slice (the transitions' columns ride along as extra batch rows).

Backward (IFT, newton.py B1-B2): lam_t = g_t + J_{t+1}^T lam_{t+1} spans the ranks in reverse.
Each rank solves its slice from a zero carry (lam~) with transitions Q_t = J_{t+1}^T ... J_{L-1}^T,
and passes c_r = J_0^T lam_0 = A_r c_{r+1} + b_r to rank r-1 (A_r = J_0^T Q_0, b_r = J_0^T lam~_0):
one all-gather of (A_r, b_r); rank r folds the ranks after it into c_{r+1} and finishes lam_t =
lam~_t + Q_t c_{r+1}; the gradients of u, a, p are then local (B2). A global `initial_state` (before
each row's first token) is read on cp rank 0 only, and only rank 0 returns its gradient; a, p
gradients are each rank's part (summed over cp like every parameter's).
"""

from __future__ import annotations

import torch

from undertow.kernels.context import SpanningSolve
from undertow.kernels.dispatch import segment_starts, triton_available
from undertow.kernels.pararnn.native import native_backward, native_cp_step, native_residual
from undertow.kernels.pararnn.newton import cell_vjp, previous_states, solver_outputs, step_and_jacobian
from undertow.kernels.pararnn.reference import cell_step, state_tensor
from undertow.kernels.pararnn.scan import (
    linear_recurrence_with_transitions, matmul, matvec, reverse_linear_recurrence_with_transitions,
)


def _id_bits(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Document ids (B,) as the bits of `dtype` numbers: they travel exactly in a buffer of that dtype."""
    return ids.to(torch.int64 if dtype == torch.float64 else torch.int32).view(dtype)


def _split(buffer: torch.Tensor, shapes: list) -> list[torch.Tensor]:
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [part.view(shape) for part, shape in zip(buffer.split(sizes), shapes)]


def _boundary(links, states: torch.Tensor, doc_ids) -> tuple:
    """C0: every rank's last state (B, S, D) and, for this rank, keep0 (B,): 1 where its first token
    continues the document of rank r-1's last token (always 1 on rank 0: the row's start)."""
    B, T, S, D = states.shape
    if doc_ids is None:
        edges = torch.zeros(2, B, dtype=states.dtype, device=states.device)
    else:
        edges = _id_bits(torch.stack((doc_ids[:, 0], doc_ids[:, -1])), states.dtype)
    gathered = [_split(g, [(B, S, D), (2, B)]) for g in links.all_gather(torch.cat((states[:, -1].reshape(-1),
                                                                                    edges.reshape(-1))))]
    lasts = [g[0] for g in gathered]
    keep0 = torch.ones(B, dtype=states.dtype, device=states.device)
    if links.rank > 0:
        ints = torch.int64 if states.dtype == torch.float64 else torch.int32
        prev_last, first = gathered[links.rank - 1][1][1], gathered[links.rank][1][0]
        keep0 = (prev_last.view(ints) == first.view(ints)).to(states.dtype)
    return lasts, keep0


def _triton_scans(x: torch.Tensor) -> tuple:
    """(forward, reverse) scans for the slices: triton.py's kernels for CUDA float32 tensors, else None
    (scan.py's chunked PyTorch form)."""
    if not (x.is_cuda and x.dtype == torch.float32 and triton_available()):
        return None, None
    from undertow.kernels.pararnn.triton import linear_recurrence_triton  # imports triton: on first use

    return linear_recurrence_triton, lambda J, g: linear_recurrence_triton(J, g, reverse=True)


def spanning_newton_solve(links, cell, u, a, p, init, keep, doc_ids, iterations, tol, chunk_size) -> tuple:
    """Eqs. C0-C3 without autograd. u (B, L, 3, D), init (B, S, D) the row's initial state (used on
    rank 0), keep (B, L, 1, 1) local -> (states (B, L, S, D), residual: the global max |F_t| (0-d),
    prev: the state before this slice's first token (B, S, D), keep with token 0's entry set)."""
    rank = links.rank
    states = cell_step(cell, torch.zeros_like(init)[:, None], u, a, p)  # N0
    lasts, keep0 = _boundary(links, states, doc_ids)
    keep = keep.clone()
    keep[:, 0] = keep0[:, None, None]
    prev = init if rank == 0 else lasts[rank - 1]
    B, L, S, D = states.shape
    residual = None
    for _ in range(iterations):
        stepped = native_cp_step(cell, u, a, p, prev * keep[:, 0], keep, states)  # CPU float32
        if stepped is not None:
            stepped, P, x_last, r_max = stepped  # stepped = states + x
        else:
            f, J = step_and_jacobian(cell, previous_states(states, prev, keep), u, a, p)
            r = f - states
            x, P = linear_recurrence_with_transitions(J * keep[..., None], r, chunk_size, _triton_scans(u)[0])
            stepped, x_last, r_max = states + x, x[:, -1], r.abs().amax()
        mine = (r_max.reshape(1), P[:, -1].reshape(-1), x_last.reshape(-1), states[:, -1].reshape(-1))
        gathered = [_split(g, [(1,), (B, S, S, D), (B, S, D), (B, S, D)]) for g in links.all_gather(torch.cat(mine))]
        residual = torch.stack([g[0] for g in gathered]).amax()
        if tol is not None and residual <= tol:  # the same decision on every rank
            return states, residual, prev, keep
        out = torch.zeros_like(states[:, 0])  # C2: delta after rank j, folded from rank 0
        for j in range(rank):
            out = matvec(gathered[j][1], out) + gathered[j][2]
        states = stepped + matvec(P, out[:, None])
        if rank > 0:
            prev = gathered[rank - 1][3] + out
    mine = native_residual(cell, u, a, p, prev * keep[:, 0], keep, states)
    if mine is None:
        mine = (cell_step(cell, previous_states(states, prev, keep), u, a, p) - states).abs().amax()
    residual = torch.stack(links.all_gather(mine.reshape(1))).amax()  # C3
    return states, residual, prev, keep


class _SpanningNewton(torch.autograd.Function):
    """(u, a, p, init) -> (states (B, L, S, D), residual 0-d) over the cp ranks; backward as in the
    module docstring (one all-gather)."""

    @staticmethod
    def forward(ctx, links, cell, u, a, p, init, keep, doc_ids, iterations, tol, chunk_size):
        states, residual, prev, keep = spanning_newton_solve(links, cell, u, a, p, init, keep, doc_ids,
                                                             iterations, tol, chunk_size)
        ctx.save_for_backward(u, a, p, prev, keep, states)
        ctx.links, ctx.cell, ctx.chunk_size = links, cell, chunk_size
        ctx.mark_non_differentiable(residual)
        return states, residual

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_states, _):
        u, a, p, prev, keep, states = ctx.saved_tensors
        links = ctx.links
        grads = _native_backward(links, ctx.cell, u, a, p, prev, keep, states, g_states)
        if grads is not None:
            return (None, None, *grads, None, None, None, None, None)
        prev_states = previous_states(states, prev, keep)
        _, J = step_and_jacobian(ctx.cell, prev_states, u, a, p)
        J = J * keep[..., None]
        lam, Q = reverse_linear_recurrence_with_transitions(J, g_states, ctx.chunk_size, _triton_scans(u)[1])
        J0T = J[:, 0].transpose(-3, -2)
        A, b = matmul(J0T, Q[:, 0]), matvec(J0T, lam[:, 0])
        lam = lam + matvec(Q, _gather_carry(links, A, b)[:, None])
        d_u, d_a, d_prev, d_p = cell_vjp(ctx.cell, prev_states, u, a, p, lam)
        d_init = d_prev[:, 0] if links.rank == 0 else None  # other ranks' token 0 reads rank r-1's state
        return None, None, d_u, d_a, d_p, d_init, None, None, None, None, None


def _gather_carry(links, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One all-gather of every rank's (A_r, b_r) -> c_{r+1} (B, S, D), what the ranks after this one send
    into its last token (zero on the last rank)."""
    gathered = [_split(g, [A.shape, b.shape]) for g in links.all_gather(torch.cat((A.reshape(-1), b.reshape(-1))))]
    carry = torch.zeros_like(b)
    for j in range(links.world - 1, links.rank, -1):
        carry = matvec(gathered[j][0], carry) + gathered[j][1]
    return carry


def _native_backward(links, cell, u, a, p, prev, keep, states, g_states):
    """The backward on the native passes (CPU float32), or None: A_r = (J_{L-1} ... J_0)^T from one
    native step at the solution, b_r = J_0^T lam~_0 from a reverse pass with a zero carry, and, once
    the carry c_{r+1} is known, a second reverse pass with it added to the last token's gradient
    (lam_{L-1} = g_{L-1} + c_{r+1}), which yields lam and every gradient (B2) at once."""
    init = prev * keep[:, 0]
    stepped = native_cp_step(cell, u, a, p, init, keep, states)
    if stepped is None:
        return None
    zero_carry = native_backward(cell, u, a, p, init, keep, states, g_states)
    if zero_carry is None:  # the backward's library did not build: the PyTorch form (no message sent yet)
        return None
    A, b = stepped[1][:, -1].transpose(-3, -2), zero_carry[3] * keep[:, 0]
    g = g_states.clone()
    g[:, -1] += _gather_carry(links, A, b)
    d_u, d_a, d_p, d_init = native_backward(cell, u, a, p, init, keep, states, g)
    return d_u, d_a, d_p, d_init if links.rank == 0 else None


def solve(links, args: tuple, kwargs: dict):
    """The SpanningSolve of `pararnn` (kernels/context.py): the public function's arguments on this
    rank's slice -> what it returns, the Newton solve spanning the cp ranks. The backend is always
    the Newton solver (the reference loop has no CP form)."""
    cell, inputs, a, p = (tuple(args) + (None,) * 4)[:4]
    p = kwargs.get("p", p)
    B, L, _, D = inputs.shape
    work = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    initial_state = kwargs.get("initial_state") if links.rank == 0 else None
    init = state_tensor(cell, initial_state, B, D, inputs.device, work)
    doc_ids = kwargs.get("doc_ids")
    keep = (~segment_starts(doc_ids, (B, L), inputs.device)).to(work)[:, :, None, None]
    iterations, tol = kwargs.get("iterations", 3), kwargs.get("tol")
    states, residual = _SpanningNewton.apply(links, cell, inputs.to(work), a.to(work),
                                             None if p is None else p.to(work), init, keep, doc_ids,
                                             iterations, tol, kwargs.get("chunk_size", 64))
    return solver_outputs(cell, inputs, states, residual, iterations, tol,
                          kwargs.get("return_final_state", False), kwargs.get("return_residual", False))


SPANNING_SOLVE = SpanningSolve(solve)
