"""Expert parallelism: the experts of every MoE layer split over ep of the ranks FSDP2 shards over
(dp_shard x cp), tokens sent to the rank that holds their expert and back; and tensor parallelism
inside the experts (their SwiGLU width split over the tp ranks).

Layout. The dp_shard x cp ranks (S of them, local index r) form S / ep groups of ep ranks: rank r
computes with the experts of ep index e = r // (S / ep), i.e. experts [e E/ep, (e+1) E/ep); its ep
group (the ranks it exchanges tokens with) is {e' S/ep + r mod S/ep}. With ep = S that is every
rank; with ep < S the S / ep neighbours r with the same e compute with the same experts (replicas).
Each rank stores E / S of the experts, rows [r E/S, (r+1) E/S) (for ep = S, its own), so a weight
is one DTensor Shard(0) on FSDP2's mesh: clipping, DCP checkpoints and full_tensor() see it as any
other weight, on the mesh of the others (torch's clip_grad_norm_ cannot mix meshes). Before each
use the replicas all-gather their slices into the E/ep experts they compute with, and the backward
reduce-scatters the gradient back (expert_comm.ExpertWeight): ZeRO-3 over the replicas, with the
gradients summed over them. ep < S therefore needs E divisible by S.

A MoE layer routes its own tokens (N = its rows x its sequence slice) as on one device; then

    counts    all-to-all of the routed pairs per expert (E,) in the ep group
    dispatch  the (token, slot) pairs sorted by expert, rows x[token] (N k, d) exchanged with
              all_to_all_single (split sizes: the pairs per destination rank; uneven)
    experts   the received rows (M, d), ordered by (source rank, local expert), through the local
              experts with kernels/moe (the grouped path; one slot per row, weight 1)
    combine   the outputs (M, d) sent back by the reverse all-to-all, weighted by their routing
              weights and added at their tokens (N, d)

The backward mirrors it: each all-to-all's gradient is the all-to-all with the split sizes swapped.

Gradients of the expert weights: FSDP2 leaves them alone (ignored parameters). A rank's gradient
of the experts it computes with sums the contributions of its ep group's tokens (through the
combine's backward); summed over the replicas and the dp_replicate ranks it covers every rank's
tokens, and divided by dp x cp it is the average FSDP2 takes of the other gradients.

Tensor parallelism (tp > 1, with or without ep): every tp rank routes the same whole tokens (the
layer's input is gathered, models' moe_styles) and holds the slice [t h/tp, (t+1) h/tp) of every
expert's width: w_gate, w_up (E, d, h) Shard(2), w_down (E, h, d) Shard(1) on the tp dimension.
Its experts give a partial output, summed over tp after the combine (expert_comm.SumOverGroup);
the gradients of the tokens and routing weights, partial per slice, are summed over tp
(CopyToGroup). Without ep the expert weights are ordinary tensor-parallel parameters for FSDP2.

Models offer the hook (models/moe/layer.py): a module with `expert_parallel_plan()` returning
(n_experts, names of its stacked expert weights in moe_experts' order: gate, up, down) and an
`expert_compute` attribute that, when set, replaces kernels/moe's moe_experts with the same
signature.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from undertow.kernels.moe import moe_experts
from undertow.kernels.moe.grouped import compute_dtype, expert_counts
from undertow.parallel.expert_comm import AllToAll, CopyToGroup, ExpertWeight, SumOverGroup
from undertow.parallel.mesh import LayoutError, ParallelDims, process_groups

# the dimension of each stacked expert weight (gate, up, down) that holds the SwiGLU width h
WIDTH_DIMS = (2, 2, 1)


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


class ExpertDispatch:
    """The expert computation of one MoE layer under expert and/or tensor parallelism: moe_experts'
    signature, x (N, d), idx/weights (N, k), w_gate/w_up (E, d, h), w_down (E, h, d) -> (N, d).
    The weights are DTensors (their local values are used) or plain tensors taken as local values.

    group:      the ep group (None: no expert parallelism, the local weights hold all E experts)
    grad_scale, replicate_group, gather_group: the expert weights' gradient (ExpertWeight)
    tp_group:   the tp ranks holding the other slices of the experts' width (None: whole width)"""

    def __init__(self, group, n_experts: int, grad_scale: float = 1.0, replicate_group=None,
                 gather_group=None, tp_group=None):
        self.group, self.n_experts = group, n_experts
        self.grad_scale, self.replicate_group = grad_scale, replicate_group
        self.gather_group, self.tp_group = gather_group, tp_group

    # eager under torch.compile: host-side split sizes and collectives (a graph per split would recompile)
    @torch.compiler.disable
    def __call__(self, x, idx, weights, w_gate, w_up, w_down):
        # to_local here, eagerly: traced by torch.compile in the layer it came out whole (E, not E/ep)
        experts = [_local(w) for w in (w_gate, w_up, w_down)]
        if self.group is not None:
            experts = [ExpertWeight.apply(w, self.grad_scale, self.gather_group, self.replicate_group)
                       for w in experts]
        if self.tp_group is not None:  # the tokens' and routing weights' gradients: partial per width slice
            x, weights = CopyToGroup.apply(x, self.tp_group), CopyToGroup.apply(weights, self.tp_group)
        if self.group is None:
            out = moe_experts(x, idx, weights, *experts)
        else:
            out = self._exchange(x, idx, weights, *experts)
        return out if self.tp_group is None else SumOverGroup.apply(out, self.tp_group)

    def _exchange(self, x, idx, weights, w_gate, w_up, w_down):
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


def _expert_groups(dims: ParallelDims, mesh: DeviceMesh):
    """(ep group, gather group or None, this rank's index in dp_shard_cp) per the module docstring."""
    shard_mesh = mesh["dp_shard_cp"]  # the dp_shard x cp ranks (of this rank's pp / tp index), as FSDP2 shards
    replicas = dims.dp_shard * dims.cp // dims.ep
    if replicas == 1:
        return shard_mesh.get_group(), None, shard_mesh.get_local_rank()
    # ep index outer, replica inner: the ranks that share experts are neighbours (collective: every rank calls it)
    cache = process_groups()  # one split per mesh and ep (parallel/mesh.py: groups are built once)
    key = ("ep_split", mesh.device_type, tuple(mesh.mesh.shape), mesh.mesh_dim_names, dims.ep)
    if key not in cache:
        cache[key] = shard_mesh._unflatten(0, (dims.ep, replicas), ("ep", "ep_replica"))
    split = cache[key]
    return split.get_group("ep"), split.get_group("ep_replica"), shard_mesh.get_local_rank()


def _place(layer: nn.Module, name: str, part: torch.Tensor, mesh: DeviceMesh, placements: list) -> nn.Parameter:
    full = getattr(layer, name)
    param = nn.Parameter(DTensor.from_local(part.contiguous(), mesh, placements, run_check=False),
                         requires_grad=full.requires_grad)
    setattr(layer, name, param)
    return param


def apply_expert_parallel(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Split every MoE layer's experts over the ep ranks (ep > 1) and their width over the tp ranks
    (tp > 1), and install the dispatch, in place; nothing to do without MoE layers at ep = 1.
    Returns the expert parameters FSDP2 must leave alone (ep > 1: DTensors Shard(0) over
    "dp_shard_cp"; empty at ep = 1, where FSDP2 shards them like the others)."""
    layers = expert_layers(model)
    if not layers:
        if dims.ep > 1:
            raise LayoutError(f"parallel.ep = {dims.ep}: the model has no MoE layers to split; valid ep: 1")
        return set()
    tp_rank = mesh["tp"].get_local_rank() if dims.tp > 1 else 0
    tp_group = mesh["tp"].get_group() if dims.tp > 1 else None
    if dims.ep == 1:
        if tp_group is None:
            return set()
        for layer in layers:
            n_experts, names = layer.expert_parallel_plan()
            for name, dim in zip(names, WIDTH_DIMS):
                whole = _local(getattr(layer, name)).detach()  # tp: replicated by the family's plan
                _place(layer, name, _width_slice(whole, dims.tp, dim, tp_rank, name), mesh["tp"], [Shard(dim)])
            layer.expert_compute = ExpertDispatch(None, n_experts, tp_group=tp_group)
        return set()
    ep_group, gather_group, rank = _expert_groups(dims, mesh)
    shards = dims.dp_shard * dims.cp
    # the mesh FSDP2's parameters live on (with tp: its 2-D (dp, tp) mesh): clipping and DCP see one mesh
    mesh_names = ("dp_replicate",) * (dims.dp_replicate > 1) + ("dp_shard_cp",) + ("tp",) * (dims.tp > 1)
    weight_mesh = mesh[mesh_names] if len(mesh_names) > 1 else mesh["dp_shard_cp"]
    replicate_group = mesh["dp_replicate"].get_group() if dims.dp_replicate > 1 else None
    experts: set[nn.Parameter] = set()
    for layer in layers:
        n_experts, names = layer.expert_parallel_plan()
        if n_experts % dims.ep or (gather_group is not None and n_experts % shards):
            raise LayoutError(f"parallel.ep = {dims.ep}: n_experts = {n_experts} must be divisible by ep"
                              + (f" and by dp_shard x cp = {shards} (ep < dp_shard x cp)" if gather_group else ""))
        for name, dim in zip(names, WIDTH_DIMS):
            whole = _local(getattr(layer, name)).detach()
            part = whole.chunk(shards, dim=0)[rank]  # the experts this rank stores
            if dims.tp > 1:
                part = _width_slice(part, dims.tp, dim, tp_rank, name)
            placements = [Shard(0) if n == "dp_shard_cp" else Shard(dim) if n == "tp" else Replicate()
                          for n in mesh_names]
            experts.add(_place(layer, name, part.clone(), weight_mesh, placements))
        # FSDP2 averages the other gradients over dp x cp ranks (the trainer scales the loss for it)
        layer.expert_compute = ExpertDispatch(ep_group, n_experts, 1.0 / (dims.dp * dims.cp), replicate_group,
                                              gather_group, tp_group)
    return experts


def _width_slice(w: torch.Tensor, tp: int, dim: int, rank: int, name: str) -> torch.Tensor:
    if w.shape[dim] % tp:
        raise LayoutError(f"parallel.tp = {tp} does not divide the expert width {w.shape[dim]} ({name}); "
                          "valid tp: a divisor of model.moe's expert width")
    return w.chunk(tp, dim=dim)[rank].clone()
