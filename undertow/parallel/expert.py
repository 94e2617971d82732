"""Expert parallelism: the experts of every MoE layer split over the ranks FSDP2 shards over
(dp_shard x cp, ep = dp_shard x cp), tokens sent to the rank that holds their expert and back.

Each rank of the ep group holds E / ep consecutive experts: rank p holds experts
[p E/ep, (p+1) E/ep). A MoE layer routes its own tokens (N = its rows x its sequence slice) as on
one device; then

    counts    all-to-all of the routed pairs per expert (E,), so each rank knows what it receives
    dispatch  the (token, slot) pairs sorted by expert, rows x[token] (N k, d) exchanged with
              all_to_all_single (split sizes: the pairs per destination rank; uneven)
    experts   the received rows (M, d), ordered by (source rank, local expert), through the local
              experts with kernels/moe (the grouped path; one slot per row, weight 1)
    combine   the outputs (M, d) sent back by the reverse all-to-all, weighted by their routing
              weights and added at their tokens (N, d)

The backward mirrors it: each all-to-all's gradient is the all-to-all with the split sizes swapped.

The expert weights become DTensors sharded on dim 0 (the expert) over the "dp_shard_cp" dimension
of FSDP2's mesh (Replicate over dp_replicate under HSDP and over tp under tensor parallelism, where
every tp rank computes the whole MoE layer with its ep peers: transformer/plan.py's moe_styles), and
FSDP2 leaves them alone (ignored parameters): nothing gathers them. Their gradients: rank p's local
expert gradient already sums the contributions of every ep rank's tokens (through the combine's
backward); FSDP2 averages the other gradients over the dp x cp ranks, so the expert gradients are
divided by dp x cp and summed over the dp_replicate ranks that hold the same experts (ExpertGrad).
Because the weights stay DTensors on FSDP2's mesh, gradient clipping, DCP checkpoints and
full_tensor() treat them as any other weight.

Models offer the hook (models/moe/layer.py): a module with `expert_parallel_plan()` returning
(n_experts, names of its stacked expert weights) and an `expert_compute` attribute that, when
set, replaces kernels/moe's moe_experts with the same signature.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from undertow.kernels.moe import moe_experts
from undertow.kernels.moe.grouped import compute_dtype, expert_counts
from undertow.parallel.mesh import LayoutError, ParallelDims


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


class ExpertGrad(torch.autograd.Function):
    """Identity on a local expert weight; its gradient (this backward's part, before accumulation)
    times `scale` and summed over `group` (the dp_replicate ranks with the same experts; None: none)."""

    @staticmethod
    def forward(ctx, w, scale: float, group):
        ctx.scale, ctx.group = scale, group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        grad = grad * ctx.scale
        if ctx.group is not None:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


class ExpertDispatch:
    """The expert computation of one MoE layer under expert parallelism: moe_experts' signature,
    x (N, d), idx/weights (N, k), w_gate/w_up (E, d, h), w_down (E, h, d) -> (N, d), the weights
    DTensors sharded on the expert (their local values, this rank's E/ep experts, are used; plain
    tensors are taken as this rank's experts)."""

    def __init__(self, group, n_experts: int, grad_scale: float, replicate_group=None):
        self.group, self.n_experts = group, n_experts
        self.grad_scale, self.replicate_group = grad_scale, replicate_group

    # eager under torch.compile: host-side split sizes and collectives (a graph per split would recompile)
    @torch.compiler.disable
    def __call__(self, x, idx, weights, w_gate, w_up, w_down):
        # to_local here, eagerly: traced by torch.compile in the layer it came out whole (E, not E/ep)
        w_gate, w_up, w_down = (ExpertGrad.apply(w.to_local() if isinstance(w, DTensor) else w, self.grad_scale,
                                                 self.replicate_group) for w in (w_gate, w_up, w_down))
        ep, local_e = dist.get_world_size(self.group), w_gate.shape[0]
        N, k = idx.shape
        counts = expert_counts(idx, self.n_experts)  # (E,): pairs this rank sends to each expert
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # (ep * E/ep,): from each source
        recv_counts = recv_counts.view(ep, local_e)
        send = counts.view(ep, local_e).sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        order = torch.argsort(idx.reshape(-1), stable=True)
        token = order // k
        # rows travel in the experts' compute dtype (autocast's: bf16 on GPU), as kernels/moe computes them
        rows = AllToAll.apply(x[token].to(compute_dtype(x)), recv, send, self.group)  # (M, d) by (source, expert)
        local_idx = torch.arange(local_e, device=x.device).repeat(ep).repeat_interleave(recv_counts.reshape(-1))
        if rows.shape[0]:
            ys = moe_experts(rows, local_idx[:, None], rows.new_ones(rows.shape[0], 1), w_gate, w_up, w_down)
        else:  # nothing routed here: the weights still get a (zero) gradient, as every rank must
            ys = rows + 0 * (w_gate.sum() + w_up.sum() + w_down.sum()).to(rows.dtype)
        back = AllToAll.apply(ys, send, recv, self.group)  # (N k, d) in `order`
        pair_weight = weights.reshape(-1)[order]
        acc = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        return acc.index_add(0, token, (back * pair_weight[:, None].to(back.dtype)).to(acc.dtype)).to(x.dtype)


def expert_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that offer the expert-parallel hook (MoE layers of any family)."""
    return [m for m in model.modules() if callable(getattr(m, "expert_parallel_plan", None))]


def apply_expert_parallel(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Split every MoE layer's experts over the dp_shard x cp ranks and install the all-to-all
    dispatch, in place. Returns the expert parameters (DTensors, Shard(0) over "dp_shard_cp"), for
    FSDP2 to ignore."""
    layers = expert_layers(model)
    if not layers:
        raise LayoutError(f"parallel.ep = {dims.ep}: the model has no MoE layers to split; valid ep: 1")
    shard_mesh = mesh["dp_shard_cp"]  # the dp_shard x cp ranks (of this rank's tp index), as FSDP2 shards
    # the mesh FSDP2's parameters live on (with tp: its 2-D (dp, tp) mesh): clipping and DCP see one mesh
    names = (("dp_replicate",) if dims.dp_replicate > 1 else ()) + ("dp_shard_cp",) + (("tp",) if dims.tp > 1 else ())
    weight_mesh = mesh[names] if len(names) > 1 else shard_mesh
    placements = [Shard(0) if n == "dp_shard_cp" else Replicate() for n in names]
    replicate_group = mesh["dp_replicate"].get_group() if dims.dp_replicate > 1 else None
    rank, group = shard_mesh.get_local_rank(), shard_mesh.get_group()
    experts: set[nn.Parameter] = set()
    for layer in layers:
        n_experts, names = layer.expert_parallel_plan()
        if n_experts % dims.ep:
            raise LayoutError(f"parallel.ep = {dims.ep} does not divide n_experts = {n_experts}")
        for name in names:
            full = getattr(layer, name)
            whole = full.to_local() if isinstance(full, DTensor) else full  # tp: replicated (transformer/plan.py)
            part = whole.detach().chunk(dims.ep, dim=0)[rank].clone()
            param = nn.Parameter(DTensor.from_local(part, weight_mesh, placements, run_check=False),
                                 requires_grad=full.requires_grad)
            setattr(layer, name, param)
            experts.add(param)
        # FSDP2 averages the other gradients over dp x cp ranks (the trainer scales the loss for it)
        layer.expert_compute = ExpertDispatch(group, n_experts, 1.0 / (dims.dp * dims.cp), replicate_group)
    return experts
