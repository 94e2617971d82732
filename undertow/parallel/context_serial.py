"""Context parallelism for recurrences whose state cannot be composed across a split (the state
after a slice is a nonlinear function of the state before it; the op declares a SerialPassing,
kernels/context.py, in its kernels/<op>/context.py): the ranks of the cp group run their slices
one after another.

Forward, rank r: receive (state, the document id of rank r-1's last token) from rank r-1, zero the
rows whose document starts at this rank's first token, run the op on the slice from that state,
send the final state (and this rank's last document id) to rank r+1. Backward, in reverse: receive
the final state's gradient from rank r+1, back-propagate the slice, send the initial state's
gradient to rank r-1. Point-to-point only, in the same order on every rank, so it interleaves with
the other ops' collectives without deadlock.

Cost: no parallel speed-up for the op (rank r waits for ranks 0..r-1, forward and backward: the
op's time is cp x one slice's), while its activations are split like every other op's; traffic one
state per rank boundary and direction (the op's state_shapes) plus B document ids. A model that
mixes such an op with parallel layers keeps the speed-up of those.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from undertow.kernels.context import SerialPassing, local_only
from undertow.parallel.context_state import doc_edges


def _peer(group, offset: int) -> int:
    return dist.get_global_rank(group, dist.get_rank(group) + offset)


def _numels(shapes) -> list[int]:
    return [int(torch.Size(s).numel()) for s in shapes]


class _ReceiveState(torch.autograd.Function):
    """Forward: the state from the previous rank, zeroed on rows whose document starts at this rank's
    first token (float32, `shapes`). Backward: sends the state's gradient back. `anchor` is an empty
    leaf that requires grad, so autograd runs the backward although nothing else comes in."""

    @staticmethod
    def forward(ctx, anchor, shapes, first_doc, group):
        rows = first_doc.shape[0]
        buffer = torch.empty(sum(_numels(shapes)) + rows, dtype=torch.float32, device=first_doc.device)
        dist.recv(buffer, src=_peer(group, -1), group=group)
        *states, prev_last = buffer.split(_numels(shapes) + [rows])
        keep = (prev_last.view(torch.int32) == first_doc.view(torch.int32)).float()
        ctx.group, ctx.keep, ctx.shapes = group, keep, shapes
        return tuple(s.view(shape) * keep.view(-1, *[1] * (len(shape) - 1)) for s, shape in zip(states, shapes))

    @staticmethod
    def backward(ctx, *grads):
        parts = [(g if g is not None else torch.zeros(shape, device=ctx.keep.device)).float()
                 * ctx.keep.view(-1, *[1] * (len(shape) - 1)) for g, shape in zip(grads, ctx.shapes)]
        dist.send(torch.cat([p.reshape(-1) for p in parts]), dst=_peer(ctx.group, -1), group=ctx.group)
        return None, None, None, None


class _SendState(torch.autograd.Function):
    """Forward: sends the final state (and this rank's last document ids) to the next rank; returns
    a zero scalar the caller adds to its output, so the backward runs. Backward: receives the final
    state's gradient from the next rank."""

    @staticmethod
    def forward(ctx, group, last_doc, *states):
        ctx.group, ctx.shapes = group, [s.shape for s in states]
        ctx.device = last_doc.device
        payload = torch.cat([s.detach().float().reshape(-1) for s in states] + [last_doc])
        dist.send(payload, dst=_peer(group, 1), group=group)
        return last_doc.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        buffer = torch.empty(sum(_numels(ctx.shapes)), dtype=torch.float32, device=ctx.device)
        dist.recv(buffer, src=_peer(ctx.group, 1), group=ctx.group)
        grads = [g.view(shape) for g, shape in zip(buffer.split(_numels(ctx.shapes)), ctx.shapes)]
        return None, None, *grads


def run_serial(cp, spec: SerialPassing, fn, args: tuple, kwargs: dict):
    """Run recurrence op `fn(*args, **kwargs)` on this rank's slice, its state passed rank to rank.
    A global `initial_state` (before each row's first token) is read on cp rank 0 only. Returns what
    fn returns: y, or (y, the state after this rank's slice)."""
    rank, world = cp.rank, cp.world
    x = args[0]
    edges = doc_edges(kwargs.get("doc_ids"), x.shape[0], x.device)  # (2, rows): first and last doc ids
    with local_only():
        start = kwargs.get("initial_state")
        if rank > 0:
            anchor = torch.empty(0, device=x.device, requires_grad=torch.is_grad_enabled())
            start = _ReceiveState.apply(anchor, spec.state_shapes(args, kwargs), edges[0], cp.group)
        y, final = fn(*args, **{**kwargs, "initial_state": start, "return_final_state": True})
        if rank < world - 1:
            y = y + _SendState.apply(cp.group, edges[1], *final).to(y.dtype)
    return (y, final) if kwargs.get("return_final_state") else y
