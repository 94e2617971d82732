"""Tensor (+ sequence) parallel plan of the Mamba family; parallel/tensor.py applies it.

Each block is `x + mixer(norm(x))`; the norm and the residual stream follow the transformer's
sequence-parallel layout and `*` / `-` layers the transformer's attention / MLP styles (SwiGLU's
gate, up or the GELU MLP's fc1 column-wise, down or fc2 row-wise).

Mamba-1 (`m`) is split by channels of d_inner: in_proj_x/z column-wise, the conv, dt_proj, A_log
and D per channel. x_proj reduces over the channels, so it is row-wise with its output (dt, B, C)
all-reduced; the mixer then uses those whole vectors (Falcon-Mamba's weightless norms included) for
its own channels, so their gradient is all-reduced too (`SharedRowwiseParallel`).

Mamba-2 (`M`) is split by heads and by groups: z, x, dt projections by heads, B, C projections by
groups, so tp must divide ngroups as well as the heads (Megatron-LM's rule; replicating B and C
when ngroups < tp would compute them on every rank and need their gradients summed). The conv
weight, whose rows are x | B | C, stays replicated (it is d_conv numbers per channel) and each rank
convolves with the rows of its channels (`local_row_parts`); dt_bias, A_log, D and the gated
norm's weight are split by heads (whole norm groups per rank). out_proj is row-wise. The mixer's
run-time fusion of the five projections works on the local shards (`Mamba2Mixer.project`).

The sizes tp must divide (d_inner, heads, ngroups, ...) are the spec's `shape_limits` (spec.py).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Partial, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from undertow.models.transformer.plan import (
    attention_styles,
    mixer_input,
    mlp_styles,
    moe_params,
    moe_styles,
    norm_styles,
    output_projection,
)


class SharedRowwiseParallel(RowwiseParallel):
    """Row-wise Linear whose all-reduced output every rank uses for its own shard of the work
    (Mamba-1's dt, B, C, shared by all channels). Returned as a local tensor; in the backward pass
    the ranks' partial gradients of it are all-reduced before the projection's backward, which then
    needs no communication (with RowwiseParallel's local output, each rank's partial gradient would
    be taken for the whole one)."""

    def __init__(self):
        super().__init__(output_layouts=Replicate())

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        summed = outputs.redistribute(placements=output_layouts)  # all-reduce
        # A replicated-to-replicated redistribute is the identity forward; backward it turns the
        # Partial gradient below into a replicated one (all-reduce).
        return summed.redistribute(placements=output_layouts).to_local(grad_placements=[Partial()])


def _mamba1_styles(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    return {
        "mixer": mixer_input(2, sequence_parallel),  # mixer(u, doc_ids)
        "mixer.in_proj_x": ColwiseParallel(),
        "mixer.in_proj_z": ColwiseParallel(),
        "mixer.x_proj": SharedRowwiseParallel(),  # dt|B|C summed over every rank's channels
        "mixer.dt_proj": ColwiseParallel(),  # weight and bias by channel; the mixer reads them
        "mixer.out_proj": output_projection(sequence_parallel),
    }


def _mamba2_styles(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    projections = ("in_proj_z", "in_proj_x", "in_proj_B", "in_proj_C", "in_proj_dt")
    return {
        "mixer": mixer_input(2, sequence_parallel),  # mixer(u, doc_ids)
        **{f"mixer.{name}": ColwiseParallel() for name in projections},
        "mixer.out_proj": output_projection(sequence_parallel),
    }


def block_styles(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    mixer = {
        "m": _mamba1_styles,
        "M": _mamba2_styles,
        "*": lambda sp: attention_styles("mixer", sp),
        "-": lambda sp: mlp_styles("mixer", block.mixer, sp),
        "E": lambda sp: moe_styles("mixer", sp),
    }[block.kind](sequence_parallel)
    return {**norm_styles(["norm"], sequence_parallel), **mixer}


def block_params(block: nn.Module) -> dict[str, Placement]:
    mixer = block.mixer
    if block.kind == "E":
        return moe_params("mixer", mixer)
    if block.kind == "m":
        names = ["conv_weight", "conv_bias", "A_log", "D"]
        placements = {name: Shard(0) for name in names}
    elif block.kind == "M":
        placements = {"conv_weight": Replicate(), "conv_bias": Replicate()}
        placements.update({name: Shard(0) for name in ("dt_bias", "A_log", "D", "norm.weight")})
    else:
        return {}
    present = dict(mixer.named_parameters())  # conv_bias is None without cfg.conv_bias
    return {f"mixer.{name}": p for name, p in placements.items() if name in present}
