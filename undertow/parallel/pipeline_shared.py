"""Modules of the shell that the blocks of every pipeline stage use (`model.shared_by_blocks`, e.g. a
router recurrent across layers) under pipeline parallelism with data or context parallelism.

Such a module belongs to no stage module: the stages reach it through the shell (StageModule keeps
the shell out of its submodules, and a module of several stage modules could not be one FSDP
root's). So FSDP2 does not hold it, and it is placed here instead, by hand:

    weights    replicated on every rank: pp ranks hold copies (broadcast from pp rank 0 when the
               pipeline is built), and on FSDP2's mesh (dp_replicate, dp_shard_cp[, tp]) they become
               DTensors with Replicate() everywhere (`replicate_on_data_mesh`), so clipping, the
               optimizer and DCP checkpoints see one mesh with FSDP2's parameters
    gradients  each rank's grad holds the contribution of its stages' blocks on its tokens; they are
               summed over the pp ranks (as tied embeddings are) and averaged over the dp x cp ranks
               (as FSDP2 averages its parameters': the trainer scales the loss for that average)
               before the optimizer step (`reduce_shared_grads`)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from undertow.parallel.mesh import ParallelDims


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the modules `model.shared_by_blocks` names (looked up each time: tensor
    parallelism and `replicate_on_data_mesh` replace them)."""
    modules = [getattr(model, name, None) for name in getattr(model, "shared_by_blocks", ())]
    return [p for m in modules if m is not None for p in m.parameters()]


def replicate_on_data_mesh(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh) -> None:
    """Make the shared modules' parameters Replicate() DTensors on FSDP2's mesh (with the tp dimension
    under tensor parallelism, where they are replicated already), in place, before the optimizer is built."""
    names = (("dp_replicate",) if dims.dp_replicate > 1 else ()) + ("dp_shard_cp",) + (("tp",) if dims.tp > 1 else ())
    data_mesh = mesh[names] if len(names) > 1 else mesh[names[0]]
    for name in getattr(model, "shared_by_blocks", ()):
        module = getattr(model, name, None)
        if module is None:
            continue
        for full_name, param in list(module.named_parameters()):
            local = param.to_local() if isinstance(param, DTensor) else param
            owner_name, _, attr = full_name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            placed = DTensor.from_local(local.detach(), data_mesh, [Replicate()] * len(names), run_check=False)
            setattr(owner, attr, nn.Parameter(placed, requires_grad=param.requires_grad))


def reduce_shared_grads(params: list[nn.Parameter], pp_group, data_group=None, data_ranks: int = 1) -> None:
    """Each shared parameter's gradient summed over `pp_group` (zeros where a stage used none) and,
    with `data_group`, averaged over its `data_ranks` ranks (the dp x cp ranks)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(grad, group=pp_group)
        if data_group is not None:
            dist.all_reduce(grad, group=data_group)
            grad.div_(data_ranks)
