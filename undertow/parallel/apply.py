"""Apply a parallel layout to a materialized single-device model, in DESIGN.md's fixed order:

    tensor/sequence parallel -> context parallel -> activation checkpointing -> torch.compile
    -> FSDP2 (data parallel)

The model arrives materialized and initialized identically on every rank (same seed), so every
layout starts from the weights a single process would have: runs under different layouts are
comparable step for step. (Materializing the full model before sharding costs one full fp32 copy
per device at start-up: 28 GB for a 7B model.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from undertow.log import get_logger
from undertow.parallel.context import apply_context_parallel
from undertow.parallel.data import apply_fsdp, fsdp_mesh, uses_fsdp
from undertow.parallel.mesh import ParallelDims
from undertow.parallel.tensor import apply_tensor_parallel
from undertow.parallel.wrap import apply_activation_checkpointing, apply_compile

log = get_logger("undertow.parallel")


def parallelize(
    model: nn.Module,
    spec,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
    engine: str = "fsdp",
) -> nn.Module:
    """Returns the model to train (the same module, changed in place). With engine = "deepspeed"
    data parallelism is left to DeepSpeed (the trainer hands it the model and the optimizer)."""
    # pp > 1: the trainer has already pruned `model` to this rank's pipeline stages (parallel/pipeline.py)
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], spec, sequence_parallel=True)
    if dims.cp > 1:
        apply_context_parallel(model, mesh["cp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if uses_fsdp(dims) and engine == "fsdp":
        apply_fsdp(model, fsdp_mesh(dims, mesh), param_dtype)
        log.info("FSDP2 over %s (param dtype %s, gradients reduced in float32)", dims.describe(), param_dtype)
    return model
