"""Tensor (+ sequence) parallel plan of the xLSTM family; parallel/tensor.py applies it.

Each block is two pre-norm residual branches, like the transformer's: its RMSNorms and the
residual stream follow the transformer's sequence-parallel layout, and the SwiGLU FFN the
transformer's MLP styles (gate and up column-wise, down row-wise).

The mLSTM layer is split by heads: q, k, v, the output gate and the input/forget gates (weights
and biases) column-wise, so each rank computes its heads' q, k, v, i~, f~ and runs the kernel on
them alone (heads never interact inside the recurrence); the per-head norm's weight is sharded
by head with them (each rank normalizes its own heads); out_proj is row-wise and sums the ranks'
partial outputs back into the residual stream (reduce-scattered onto sequence shards under
sequence parallelism). The sizes tp must divide (heads, FFN width) are the spec's `shape_limits`.

Attention (`*`) and MLP (`-`) layers take the transformer's styles (by head; column- then row-wise).

The paper's blocks split by heads too (tp must divide their heads: the spec's shape_limits).
`s` (sLSTM): every part of the layer is per head or per channel (the causal conv per channel, the
block-diagonal gate projections, recurrent R and biases per head, the GroupNorm per head), and its
output has no projection: the layer runs on this rank's d_model / tp channels of the whole sequence
(its input re-laid from sequence shards to channel shards, an all-to-all; a slice without sequence
parallelism) and its output goes back to the residual layout the same way (all-to-all / all-gather).
Its gated GeLU FFN is column- then row-wise like the SwiGLU. `M` (up-projection mLSTM): up_a and
up_z column-wise, so a rank holds its heads' inner channels; the conv, the block-diagonal q/k/v
(blocks of up_qkv_block, which divides a head), the per-head norm and the skip weight sharded with
them; the input and forget gates read every head's q, k and v: their weights stay replicated,
each rank multiplies its channels by their columns and the partial pre-activations are
reduce-scattered onto the heads (up_mlstm_layer.py), the biases split by head; down is row-wise
into the residual stream.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleInputOutput

from undertow.models.transformer.plan import (
    attention_styles,
    mixer_input,
    mlp_styles,
    moe_params,
    moe_styles,
    norm_styles,
    output_projection,
    residual_layout,
)

_BY_HEAD = ("q", "k", "v", "igate", "fgate", "ogate")


_CHANNELS = Shard(2)  # (B, T, channels) split on the channels: a rank's heads


def _channel_mixer(sequence_parallel: bool) -> PrepareModuleInputOutput:
    """A mixer called as mixer(x, doc_ids) that computes on this rank's channels (B, T, d_model / tp)
    of the whole sequence and returns them (no output projection): both ways between the residual
    layout and channel shards (all-to-all under sequence parallelism, slice / all-gather without)."""
    residual = residual_layout(sequence_parallel)
    return PrepareModuleInputOutput(
        input_layouts=(residual, None), desired_input_layouts=(_CHANNELS, None), use_local_input=True,
        output_layouts=(_CHANNELS,), desired_output_layouts=(residual,), use_local_output=True,
    )


def _ffn_styles(prefix: str, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The gated FFN of `s` blocks (GatedGeluFFN: gate_proj, up_proj, down_proj, as SwiGLU's)."""
    return {
        prefix: mixer_input(1, sequence_parallel),
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": output_projection(sequence_parallel),
    }


def block_styles(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    if block.kind == "*":
        return {**norm_styles(["norm"], sequence_parallel), **attention_styles("attn", sequence_parallel)}
    if block.kind == "-":
        return {**norm_styles(["norm"], sequence_parallel), **mlp_styles("mlp", block.mlp, sequence_parallel)}
    if block.kind == "E":
        return {**norm_styles(["norm"], sequence_parallel), **moe_styles("mlp", sequence_parallel)}
    if block.kind == "s":
        return {
            **norm_styles(["norm_slstm", "norm_ffn"], sequence_parallel),
            "slstm": _channel_mixer(sequence_parallel),
            **_ffn_styles("ffn", sequence_parallel),
        }
    if block.kind == "M":
        return {
            **norm_styles(["norm_mlstm"], sequence_parallel),
            "mlstm": mixer_input(2, sequence_parallel),  # mlstm(x, doc_ids)
            "mlstm.up_a": ColwiseParallel(),
            "mlstm.up_z": ColwiseParallel(),
            "mlstm.down": output_projection(sequence_parallel),
        }
    if block.kind != "m":
        raise ValueError(f"the xLSTM block {block.kind!r} has no tensor-parallel plan (see models/xlstm/plan.py)")
    return {
        **norm_styles(["norm_mlstm", "norm_ffn"], sequence_parallel),
        "mlstm": mixer_input(2, sequence_parallel),  # mlstm(x, doc_ids)
        **{f"mlstm.{name}": ColwiseParallel() for name in _BY_HEAD},
        "mlstm.out_proj": output_projection(sequence_parallel),
        **mlp_styles("ffn", block.ffn, sequence_parallel),
    }


# Parameters no style owns, by the dim that runs over heads (or their channels)
_SLSTM_PARAMS = {"conv.weight": 0, "conv.bias": 0, "igate.weight": 0, "fgate.weight": 0, "zgate.weight": 0,
                 "ogate.weight": 0, "bias": 1, "R": 1, "norm.weight": 0}
_UP_MLSTM_PARAMS = {"conv.weight": 0, "conv.bias": 0, "q.weight": 0, "k.weight": 0, "v.weight": 0,
                    "igate.bias": 0, "fgate.bias": 0, "norm.weight": 0, "skip": 0}
# the M block's gate weights (H, 3 E): replicated, each rank reads the columns of its channels
_UP_MLSTM_REPLICATED = ("igate.weight", "fgate.weight")


def block_params(block: nn.Module) -> dict[str, Placement]:
    if block.kind == "E":
        return moe_params("mlp", block.mlp)
    if block.kind == "s":
        return {f"slstm.{name}": Shard(dim) for name, dim in _SLSTM_PARAMS.items()}
    if block.kind == "M":
        return {**{f"mlstm.{name}": Shard(dim) for name, dim in _UP_MLSTM_PARAMS.items()},
                **{f"mlstm.{name}": Replicate() for name in _UP_MLSTM_REPLICATED}}
    if block.kind != "m":
        return {}  # attention and MLP parameters all belong to styled Linears and norms
    return {"mlstm.norm.weight": Shard(0)}  # per head, beside the heads' channels
