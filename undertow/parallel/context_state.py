"""Context parallelism for recurrences: state passing across the ranks of the cp group.

Rank r holds tokens [r T/cp, (r+1) T/cp) of every row. A recurrence op whose state is linear in
its initial state, slice by slice,

    final_state(h0) = transition * h0 + final_state(0)        (* broadcasts: a diagonal transition)

runs in three steps (`run_state_passing`):
  1. each rank computes final_state(0) of its slice and its cumulative `transition` (zero once a
     document starts inside the slice, so the carried state stops there);
  2. the ranks all-gather (final_state(0), transition, first and last document id of each row), and
     rank r folds the ranks before it into its true initial state, zeroed for the rows whose
     document starts at rank r's first token (`exchange_states`);
  3. each rank re-runs the op on its slice from that initial state: outputs and final state are
     exact. Cost: the op twice per step, unless it declares a cheaper `final_from_zero`.
The backward pass mirrors step 2: each rank all-gathers the gradient of its initial state and
folds those of the ranks after it, in reverse, into the gradients of its final state and
transition (`_ExchangeStates.backward`); autograd does the rest. A global `initial_state` (the
state before each row's first token) is read on cp rank 0 only.

An op whose state is affine only in a form it does not store (e.g. a state kept scaled by a
running-max stabilizer) declares a `combine` instead of the affine form: its states are tuples,
folded by `fold_combined`, and the backward is autograd through a replay of that fold (`fold_combined_vjp`,
a few small ops per rank) instead of the hand-written adjoint.

An op declares how it passes state with a `StatePassing` in its own folder
(kernels/<op>/context.py; the contract is in kernels/context.py); nothing here names an op. The
op's public function must take `initial_state`, `doc_ids` and `return_final_state` keywords and
return (y, final_state) when asked: the kernel contract of DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from undertow.kernels.context import StatePassing, local_only
from undertow.parallel.context_comm import all_gather

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


def doc_edges(doc_ids: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    """(2, rows) int32 document ids of each row's first and last token (zeros without doc_ids),
    their bits viewed as float32 so they travel in the states' buffer exactly."""
    if doc_ids is None:
        return torch.zeros(2, rows, device=device)
    return torch.stack([doc_ids[:, 0], doc_ids[:, -1]]).to(torch.int32).view(torch.float32)


def _view_rows(flags: torch.Tensor, ndim: int) -> torch.Tensor:
    return flags.view(flags.shape[0], *([1] * (ndim - 1)))


def continues(edges: list[torch.Tensor], ndim: int) -> list[torch.Tensor | None]:
    """Per rank j >= 1: (B, 1, ...) float, 1 for the rows whose first token at rank j continues the
    document of rank j-1's last token (edges[j]: `doc_edges`); None for rank 0."""
    ids = [e.view(torch.int32) for e in edges]
    return [None] + [_view_rows((ids[j][0] == ids[j - 1][1]).float(), ndim) for j in range(1, len(edges))]


def fold_forward(finals, transitions, keep, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s initial state and out_{rank-1}, the state after the previous rank's last token:
    out_0 = finals_0, out_j = finals_j + transitions_j * keep_j * out_{j-1}; initial = keep_rank *
    out_{rank-1} (zeros on rank 0)."""
    out_prev = torch.zeros_like(finals[0])
    for j in range(rank):
        out_prev = finals[j] if j == 0 else finals[j] + transitions[j] * keep[j] * out_prev
    initial = keep[rank] * out_prev if rank > 0 else torch.zeros_like(finals[0])
    return initial, out_prev


def fold_backward(grad_initials, transitions, keep, rank: int) -> torch.Tensor:
    """The gradient of out_rank (= of finals_rank) from every rank's initial-state gradient:
    d out_{s-1} = keep_s * (grad_initial_s + transitions_s * d out_s), from d out_{world-1} = 0."""
    grad_out = torch.zeros_like(grad_initials[0])
    for s in range(len(grad_initials) - 1, rank, -1):
        grad_out = keep[s] * (grad_initials[s] + transitions[s] * grad_out)
    return grad_out


class _ExchangeStates(torch.autograd.Function):
    """final (B, *S), transition (broadcastable to final), edges (2, B) -> this rank's initial
    state (B, *S) by `fold_forward` over every rank's gathered values."""

    @staticmethod
    def forward(ctx, final, transition, edges, group):
        rank = dist.get_rank(group)
        sizes = [final.numel(), transition.numel(), edges.numel()]
        buffer = torch.cat([final.reshape(-1), transition.reshape(-1), edges.reshape(-1)])
        pieces = [g.split(sizes) for g in all_gather(buffer, group)]
        finals = [p[0].view_as(final) for p in pieces]
        transitions = [p[1].view_as(transition) for p in pieces]
        keep = continues([p[2].view_as(edges) for p in pieces], final.ndim)
        initial, out_prev = fold_forward(finals, transitions, keep, rank)
        ctx.group, ctx.keep, ctx.transitions = group, keep, transitions
        ctx.transition_shape = transition.shape
        ctx.save_for_backward(out_prev)
        return initial

    @staticmethod
    def backward(ctx, grad_initial):
        (out_prev,) = ctx.saved_tensors
        rank = dist.get_rank(ctx.group)
        grad_out = fold_backward(all_gather(grad_initial, ctx.group), ctx.transitions, ctx.keep, rank)
        if rank == 0:  # rank 0's transition acts on the global initial state, outside this function
            grad_transition = torch.zeros(ctx.transition_shape, dtype=grad_out.dtype, device=grad_out.device)
        else:
            grad_transition = (grad_out * ctx.keep[rank] * out_prev).sum_to_size(ctx.transition_shape)
        return grad_out, grad_transition, None, None


def fold_combined(finals, transitions, keep, combine) -> list[tuple[torch.Tensor, ...]]:
    """Every rank's initial state for an op with a `combine` (StatePassing.combine): states are tuples,
    out_0 = finals_0, out_j = combine(initial_j, finals_j, transitions_j), initial_j = keep_j * out_{j-1}
    (the zero state, all zeros, where a document starts at rank j's first token; zeros on rank 0).
    keep: `continues(edges, 1)`, (B,) per rank. Plain autograd: its backward is `fold_combined_vjp`."""
    initials = [tuple(torch.zeros_like(x) for x in finals[0])]
    out = finals[0]
    for j in range(1, len(finals)):
        initials.append(tuple(_view_rows(keep[j], x.ndim) * x for x in out))
        out = combine(initials[j], finals[j], transitions[j])
    return initials


def fold_combined_vjp(grad_initials, finals, transitions, keep, combine, rank: int):
    """The gradients of rank `rank`'s final state (a tuple) and transition from every rank's
    initial-state gradient: autograd through a replay of `fold_combined` (a few small ops per rank)."""
    with torch.enable_grad():
        mine = tuple(x.detach().requires_grad_() for x in finals[rank])
        transition = transitions[rank].detach().requires_grad_()
        initials = fold_combined([mine if j == rank else finals[j] for j in range(len(finals))],
                                 [transition if j == rank else t for j, t in enumerate(transitions)], keep, combine)
        loss = sum((g * x).sum() for s in range(rank + 1, len(finals)) for g, x in zip(grad_initials[s], initials[s]))
        leaves = (*mine, transition)
        if not torch.is_tensor(loss):  # the last rank: its final state feeds no one
            return tuple(torch.zeros_like(x) for x in leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))


class _ExchangeCombined(torch.autograd.Function):
    """`_ExchangeStates` for an op with a combine: final a tuple of (B, ...) tensors, transition
    (B, ...) -> this rank's initial state (a tuple) by `fold_combined`; backward by `fold_combined_vjp`."""

    @staticmethod
    def forward(ctx, combine, edges, group, transition, *final):
        parts = [*final, transition, edges]
        sizes = [p.numel() for p in parts]
        pieces = [g.split(sizes) for g in all_gather(torch.cat([p.reshape(-1) for p in parts]), group)]
        ctx.finals = [tuple(p[j].view_as(x) for j, x in enumerate(final)) for p in pieces]
        ctx.transitions = [p[len(final)].view_as(transition) for p in pieces]
        ctx.keep = continues([p[-1].view_as(edges) for p in pieces], 1)
        ctx.combine, ctx.group = combine, group
        return fold_combined(ctx.finals, ctx.transitions, ctx.keep, combine)[dist.get_rank(group)]

    @staticmethod
    def backward(ctx, *grad_initial):
        sizes = [g.numel() for g in grad_initial]
        gathered = [tuple(p.view_as(g) for p, g in zip(buf.split(sizes), grad_initial))
                    for buf in all_gather(torch.cat([g.reshape(-1) for g in grad_initial]), ctx.group)]
        *grad_final, grad_transition = fold_combined_vjp(gathered, ctx.finals, ctx.transitions, ctx.keep, ctx.combine,
                                                         dist.get_rank(ctx.group))
        return None, None, None, grad_transition, *grad_final


def _run_combined(cp, spec: StatePassing, fn: Callable, args: Args, kwargs: Kwargs, final, transition):
    """run_state_passing's last two steps for an op with a combine: rank 0 folds the row's initial
    state (the zero state when none is given: for such an op it is not combine's identity) into its
    final state; the ranks exchange; each runs its slice from its true initial state."""
    initial = kwargs.get("initial_state")
    final = tuple(x.float() for x in final)
    if cp.rank == 0:
        prev = tuple(x.float() for x in initial) if initial is not None else tuple(torch.zeros_like(x) for x in final)
        final = spec.combine(prev, final, transition.float())
    edges = doc_edges(kwargs.get("doc_ids"), final[0].shape[0], final[0].device)
    start = _ExchangeCombined.apply(spec.combine, edges, cp.group, transition.float().contiguous(),
                                    *(x.contiguous() for x in final))
    if cp.rank == 0 and initial is not None:  # rank 0's exchanged state is zeros; its own enters here
        start = tuple(s + x.float() for s, x in zip(start, initial))
    return fn(*args, **{**kwargs, "initial_state": start})


def exchange_states(final: torch.Tensor, transition: torch.Tensor, doc_ids: torch.Tensor | None, group) -> torch.Tensor:
    """This rank's true initial state (float32, final's shape) from every rank's final state from
    zero and transition (see _ExchangeStates); one all-gather forward, one backward."""
    final = final.float()
    edges = doc_edges(doc_ids, final.shape[0], final.device)
    return _ExchangeStates.apply(final, transition.float().contiguous(), edges, group)


def run_state_passing(cp, spec: StatePassing, fn: Callable, args: Args, kwargs: Kwargs):
    """Run recurrence op `fn(*args, **kwargs)` on this rank's slice with its true initial state.
    Returns what fn returns: y, or (y, the state after the slice's last token)."""
    doc_ids, initial = kwargs.get("doc_ids"), kwargs.get("initial_state")
    with local_only():
        if spec.final_from_zero is not None:
            final = spec.final_from_zero(fn, args, kwargs)
        else:
            final = fn(*args, **{**kwargs, "initial_state": None, "return_final_state": True})[1]
        transition = spec.transition(args, kwargs)
        if spec.combine is not None:
            return _run_combined(cp, spec, fn, args, kwargs, final, transition)
        use_initial = cp.rank == 0 and initial is not None
        if use_initial:  # the row's carried-in state enters through rank 0's slice
            final = final.float() + transition * initial.float()
        start = exchange_states(final, transition, doc_ids, cp.group)
        if use_initial:
            start = start + initial.float()
        return fn(*args, **{**kwargs, "initial_state": start})
