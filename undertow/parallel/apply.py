"""Apply a parallel layout to a materialized single-device model, in DESIGN.md's fixed order:

    tensor/sequence parallel -> context parallel -> expert parallel (and the experts' width split
    by tp) -> activation checkpointing -> torch.compile -> FSDP2 (data parallel; the expert weights
    left to expert parallelism when ep > 1)

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
from undertow.parallel.expert import apply_expert_parallel
from undertow.parallel.mesh import ParallelDims
from undertow.parallel.pipeline_shared import replicate_on_data_mesh
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
    roots: list[nn.Module] | None = None,
) -> nn.Module:
    """Returns the model to train (the same module, changed in place). With engine = "deepspeed"
    data parallelism is left to DeepSpeed (the trainer hands it the model and the optimizer).

    pp > 1: `model` is already pruned to this rank's pipeline stages and `roots` are its stage
    modules (PipelineRunner.stage_modules), the modules whose forward runs: they get the tensor-
    parallel hooks and each becomes an FSDP root."""
    if dims.pp > 1 and roots is None:
        raise ValueError("pp > 1: pass the pipeline's stage modules as roots")
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], spec, sequence_parallel=True, roots=roots)
    if dims.cp > 1:
        apply_context_parallel(model, mesh["cp"])
    experts = apply_expert_parallel(model, dims, mesh) if dims.ep > 1 or dims.tp > 1 else None
    if dims.dp * dims.cp > 1:  # losses that are statistics of a micro-batch's tokens on every dp/cp rank
        group = mesh["dp_cp"].get_group()
        for module in model.modules():
            if callable(getattr(module, "set_token_group", None)):
                module.set_token_group(group)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if uses_fsdp(dims) and engine == "fsdp":
        # Under pipeline parallelism the parameters stay gathered from a stage's first forward to the
        # step's last backward (as torchtitan does): resharding would all-gather again for every
        # micro-batch, and torch 2.13's zero-bubble schedules lose the final norm's and the head's
        # gradients when it reshards between forward and the split backward.
        apply_fsdp(model, fsdp_mesh(dims, mesh), param_dtype, reshard_after_forward=dims.pp == 1, roots=roots,
                   ignored=experts)
        log.info("FSDP2 over %s (param dtype %s, gradients reduced in float32)", dims.describe(), param_dtype)
        if roots is not None:  # modules every stage's blocks use: in no stage module, so not FSDP2's
            replicate_on_data_mesh(model, dims, mesh)
    return model
