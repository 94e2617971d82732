"""The collectives of expert parallelism as autograd functions (parallel/expert.py uses them).

    AllToAll      tokens to the ranks that hold their experts and back (uneven splits)
    ExpertWeight  a rank's stored expert slice -> the experts it computes with: gathered from the
                  ranks that share its experts (ep < dp_shard x cp); the gradient reduce-scattered
                  back, scaled, and summed over dp_replicate
    CopyToGroup   identity forward, gradients summed over the group backward (Megatron-LM's f)
    SumOverGroup  outputs summed over the group forward, identity backward (Megatron-LM's g)

CopyToGroup / SumOverGroup put tensor parallelism inside the experts: every tp rank holds the same
tokens and a slice of each expert's SwiGLU width; the partial outputs are summed after the down
projection, and the gradients of the (replicated) inputs, which each rank gets from its slice
only, are summed over the tp ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 names them *_single; older releases *_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class AllToAll(torch.autograd.Function):
    """x (sum(send), ...) -> (sum(recv), ...): row block i of x goes to rank i of `group`, the
    block from rank j lands at position j. Backward: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, recv: list[int], send: list[int], group):
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class ExpertWeight(torch.autograd.Function):
    """w (E / (dp_shard x cp), ...), this rank's stored experts -> (E / ep, ...), the experts its ep
    rank computes: the slices of the `gather` group concatenated in its rank order (None: w itself).

    Backward (this backward's part, before accumulation): summed over `gather` and each rank keeps
    its slice (reduce-scatter), times `scale`, summed over `replicate` (the dp_replicate ranks that
    store the same slice; None: none)."""

    @staticmethod
    def forward(ctx, w, scale: float, gather, replicate):
        ctx.scale, ctx.gather, ctx.replicate = scale, gather, replicate
        if gather is None:
            return w.view_as(w)
        out = w.new_empty((w.shape[0] * dist.get_world_size(gather), *w.shape[1:]))
        _all_gather(out, w.contiguous(), group=gather)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.gather is not None:
            part = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.gather), *grad.shape[1:]))
            _reduce_scatter(part, grad.contiguous(), group=ctx.gather)
            grad = part
        grad = grad * ctx.scale
        if ctx.replicate is not None:
            dist.all_reduce(grad, group=ctx.replicate)
        return grad, None, None, None


class CopyToGroup(torch.autograd.Function):
    """Identity; the gradient summed over `group` (each rank's is a partial one)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SumOverGroup(torch.autograd.Function):
    """x summed over `group` (each rank holds a partial sum); the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None
