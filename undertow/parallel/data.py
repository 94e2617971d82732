"""Data parallelism with FSDP2 (`fully_shard`): sharded (FSDP), replicated-and-sharded (HSDP).

Every block of `model.layers` becomes its own FSDP unit (its parameters are gathered just before
it runs and freed after it, when `reshard_after_forward`), then the root module (embedding, final
norm, head) is one more. Parameters are sharded over the mesh's "dp_shard_cp" dimension (the
context-parallel ranks hold the same weights, so they share the shards) and, with dp_replicate >
1, replicated over "dp_replicate" (HSDP).

Gradient reduction averages over every rank FSDP spans (dp_replicate x dp_shard x cp). The
trainer scales each rank's loss so that the average is the gradient of the global token-mean loss
(see Trainer.train_step).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from undertow.parallel.mesh import ParallelDims


def fsdp_mesh(dims: ParallelDims, mesh: DeviceMesh) -> DeviceMesh:
    """The (sub)mesh FSDP2 shards over: 1-D "dp_shard_cp", or 2-D (dp_replicate, dp_shard_cp) for HSDP."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


def uses_fsdp(dims: ParallelDims) -> bool:
    return dims.dp_replicate * dims.dp_shard * dims.cp > 1


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool = True,
    roots: list[nn.Module] | None = None,
    ignored: set[nn.Parameter] | None = None,
) -> None:
    """Shard `model` in place with FSDP2. param_dtype: the dtype parameters are gathered in for
    compute (bf16 on GPU with bf16 training; None keeps float32); gradients are reduced in float32.

    roots: the modules whose forward runs, each made an FSDP root over its parameters outside the
    blocks (default: the model). Under pipeline parallelism they are this rank's stage modules, whose
    gradient reduction the pipeline schedule holds back to the step's last micro-batch."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    shared = _shared_parameters(model)
    layers = model.layers
    for i, block in enumerate(layers):
        # the last block's parameters are needed again at once by the backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=_within(block, ignored),
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    for root in roots or [model]:
        fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=_within(root, ignored))
    _retie(shared)


def _within(module: nn.Module, ignored: set[nn.Parameter] | None) -> set[nn.Parameter] | None:
    """The ignored parameters that `module` holds (None when there are none)."""
    if not ignored:
        return None
    inside = {p for p in module.parameters() if p in ignored}
    return inside or None


def _shared_parameters(model: nn.Module) -> list[tuple[nn.Parameter, list[tuple[nn.Module, str]]]]:
    """Each parameter registered in more than one place (tied weights), with its places (module, attribute)."""
    places: dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str]]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            places.setdefault(id(param), (param, []))[1].append((module, name))
    return [entry for entry in places.values() if len(entry[1]) > 1]


def _retie(shared: list[tuple[nn.Parameter, list[tuple[nn.Module, str]]]]) -> None:
    """Give every place of a tied weight the sharded parameter FSDP made in one of them. A root that
    holds only one of the places (a pipeline's last stage holds the head, not the embedding it is
    tied to) replaces that one alone, and the other would keep the unsharded original."""
    for original, places in shared:
        replaced = {id(p): p for p in (getattr(module, name) for module, name in places) if p is not original}
        if len(replaced) > 1:
            raise RuntimeError("FSDP sharded one tied weight twice; shard the modules that share it in one unit")
        for sharded in replaced.values():
            for module, name in places:
                module.register_parameter(name, sharded)
