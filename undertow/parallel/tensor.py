"""Tensor + sequence parallelism: a family's plan (models/<family>/plan.py) applied with DTensor.

    apply_tensor_parallel(model, tp_mesh, spec, sequence_parallel=True)   in place, before CP/FSDP
    tp_shape_limits(config, spec, seq_len, sequence_parallel)  -> [("tp", what, size)] for
                                                                  ParallelDims.validate
    loss_context(tp)   wrap forward, loss and backward: the loss is computed on vocab shards
                       (blocks nest: the outermost one holds torch's loss_parallel)

Nothing here names a family. The model is a CausalLMShell (embed -> layers -> norm -> lm_head);
its blocks are placed by the family's plan module (spec.plan), which offers
    block_styles(block, sequence_parallel) -> {submodule name in the block: ParallelStyle}
    block_params(block) -> {parameter name in the block: Placement}  for parameters no style owns
and the sizes tp must divide are the spec's shape_limits(config) -> [("tp", what, size)].
This file places the shared ends of the model:
  embed    vocab-sharded (RowwiseParallel): each rank looks up its rows, the partial embeddings
           are summed, reduce-scattered onto the sequence shards under sequence parallelism;
  norm     the final RMSNorm on sequence shards (SequenceParallel);
  lm_head  ColwiseParallel with the logits left sharded on the vocabulary (a DTensor), for
           loss_parallel's cross-entropy (no rank ever holds the full logits). Tied embeddings
           share one parameter, sharded on the vocabulary for both uses;
  shared   modules of the shell its blocks use (`model.shared_by_blocks`, e.g. a router that
           runs across the layers):
           replicated, computed whole on every rank.
Sequence parallelism (Megatron-LM's) keeps the residual stream (B, T / tp, d_model) per rank
between blocks; each mixer all-gathers its input and sees the whole sequence, so position ids,
document ids and cu_seqlens, which the model passes whole to every mixer, stay correct.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from undertow.parallel.mesh import LayoutError, ParallelDims


def tp_shape_limits(
    config: Any, spec: Any, seq_len: int | None = None, sequence_parallel: bool = True
) -> list[tuple[str, str, int]]:
    """[("tp", what, size)] for ParallelDims.validate: the sizes the family's spec says tp splits
    (heads, groups, channels, MLP width) and, under sequence parallelism, the sequence length."""
    named = spec.shape_limits(config) if spec.shape_limits is not None else []
    limits = [limit for limit in named if limit[0] == "tp"]
    if sequence_parallel and seq_len is not None:
        limits.append(("tp", "seq_len", seq_len))
    return limits


_loss_parallel_open = False  # whether a loss_context(tp > 1) block is open in this process


@contextlib.contextmanager
def loss_context(tp: int) -> Iterator[None]:
    """Around forward, loss and backward: loss_parallel() when tp > 1 (cross-entropy over the
    vocab-sharded logits, its backward included), otherwise nothing.

    Blocks nest: the trainer's validation opens one around PipelineRunner.loss_sum, which opens its
    own. torch's loss_parallel() is not reentrant: it adds its handlers to DTensor's process-wide
    op table on entry and pops them on exit, so an inner exit would remove the outer block's
    handlers and the outer exit fail (KeyError: aten._log_softmax). Only the outermost block enters
    it, and it leaves it even when the body raises (torch's exit, handed the exception, would skip
    the pop and leave the handlers installed for the rest of the process)."""
    global _loss_parallel_open
    if tp == 1 or _loss_parallel_open:
        yield
        return
    handlers = loss_parallel()
    handlers.__enter__()
    _loss_parallel_open = True
    try:
        yield
    finally:
        _loss_parallel_open = False
        handlers.__exit__(None, None, None)


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, spec: Any, sequence_parallel: bool = True,
    roots: list[nn.Module] | None = None,
) -> nn.Module:
    """Shard `model` (a CausalLMShell of the family `spec`, on any device, meta included) over the
    1-D `tp_mesh` in place, and return it. Parameters become DTensors on tp_mesh; names are kept.

    The logits the model returns are then a DTensor sharded on the vocabulary: compute the loss
    (models/common/loss.py) and run backward inside `loss_context(tp)`. Under sequence parallelism
    the sequence length must be a multiple of tp (checked on every forward).

    Under pipeline parallelism `model` is this rank's pruned shell (embed, norm or lm_head may be
    None: those absent are skipped) and `roots` are its stage modules, the modules whose forward
    runs (the per-forward hooks go on them; default: the model).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs the 1-D tensor-parallel mesh (mesh['tp']), got {tp_mesh}")
    if spec.plan is None:
        raise LayoutError(f"model family {spec.name!r} has no tensor-parallel plan; set parallel.tp = 1")
    tp = tp_mesh.size()
    ParallelDims(tp=tp).validate(tp, tp_shape_limits(model.cfg, spec))
    tied = model.lm_head is not None and model.embed is not None and model.lm_head.weight is model.embed.weight
    residual = Shard(1) if sequence_parallel else Replicate()
    shell = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "lm_head": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:
        shell["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, {name: style for name, style in shell.items()
                                        if getattr(model, name, None) is not None})
    if tied:  # both were distributed separately; share the embedding's (same Shard(0) on the vocab)
        model.lm_head.weight = model.embed.weight
    for block in model.layers:
        parallelize_module(block, tp_mesh, spec.plan.block_styles(block, sequence_parallel))
        for name, placement in spec.plan.block_params(block).items():
            _distribute_parameter(block, name, tp_mesh, placement)
    for shared in getattr(model, "shared_by_blocks", ()):  # modules of the shell every block uses
        if getattr(model, shared, None) is not None:
            for name, _ in list(getattr(model, shared).named_parameters()):
                _distribute_parameter(model, f"{shared}.{name}", tp_mesh, Replicate())
    for root in roots or [model]:
        root.register_forward_pre_hook(_keep_gradients_placed_like_parameters)
        if sequence_parallel:
            root.register_forward_pre_hook(_sequence_length_check(tp))
    return model


def _distribute_parameter(module: nn.Module, name: str, mesh: DeviceMesh, placement: Placement) -> None:
    owner_name, _, param_name = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    param = getattr(owner, param_name)
    if isinstance(param, DTensor):
        raise TypeError(f"{name} is already distributed ({param.placements}); the plan places it twice")
    owner.register_parameter(
        param_name, nn.Parameter(distribute_tensor(param, mesh, [placement]), requires_grad=param.requires_grad)
    )


def _keep_gradients_placed_like_parameters(model: nn.Module, args: tuple) -> None:
    """Give every .grad its parameter's placements as soon as it is accumulated (what optimizers,
    clipping and checkpoints expect). DTensor's backward leaves some otherwise: a replicated weight
    applied to sequence shards (the RMSNorms) gets a Partial gradient, summed here (all-reduce);
    the vocab-sharded embedding gets a replicated one, of which each rank keeps its rows.

    Runs before every forward, so parameters that materialization (`to_empty`) or loading replaced
    get the hook too; FSDP2, applied after, replaces them and places its own gradients."""
    for param in model.parameters():
        if isinstance(param, DTensor) and not getattr(param, "_grad_placed_like_param", False):
            param.register_post_accumulate_grad_hook(_place_grad_like_param)
            param._grad_placed_like_param = True


def _place_grad_like_param(param: DTensor) -> None:
    if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)


def _sequence_length_check(tp: int):
    def check(module: nn.Module, args: tuple) -> None:
        seq_len = args[0].shape[-1] if args and isinstance(args[0], torch.Tensor) else None
        if seq_len is not None and seq_len % tp:
            raise ValueError(
                f"sequence parallelism over tp={tp} needs the sequence length to be a multiple of {tp}, "
                f"got {seq_len}; change data.seq_len or turn sequence parallelism off"
            )

    return check
