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

The paper's blocks have no plan yet, and the spec's shape_limits refuse tp > 1 with them before any
work. `s`: its per-head GroupNorm output enters the residual stream without an output projection
(each rank's heads would have to be all-gathered back to d_model channels), and its conv reads the
whole replicated input (each rank would convolve a slice of channels). `M`: the input and forget
gates read every head's q, k and v ([q, k, v] (3E) -> H), so a split by heads needs the gate
pre-activations all-reduced from a re-laid-out weight.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Placement, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from undertow.models.transformer.plan import (
    attention_styles,
    mixer_input,
    mlp_styles,
    moe_params,
    moe_styles,
    norm_styles,
    output_projection,
)

_BY_HEAD = ("q", "k", "v", "igate", "fgate", "ogate")


def block_styles(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    if block.kind == "*":
        return {**norm_styles(["norm"], sequence_parallel), **attention_styles("attn", sequence_parallel)}
    if block.kind == "-":
        return {**norm_styles(["norm"], sequence_parallel), **mlp_styles("mlp", block.mlp, sequence_parallel)}
    if block.kind == "E":
        return {**norm_styles(["norm"], sequence_parallel), **moe_styles("mlp", sequence_parallel)}
    if block.kind != "m":
        raise ValueError(f"the xLSTM block {block.kind!r} has no tensor-parallel plan (see models/xlstm/plan.py); "
                         "use tp = 1 for layer patterns with s or M blocks")
    return {
        **norm_styles(["norm_mlstm", "norm_ffn"], sequence_parallel),
        "mlstm": mixer_input(2, sequence_parallel),  # mlstm(x, doc_ids)
        **{f"mlstm.{name}": ColwiseParallel() for name in _BY_HEAD},
        "mlstm.out_proj": output_projection(sequence_parallel),
        **mlp_styles("ffn", block.ffn, sequence_parallel),
    }


def block_params(block: nn.Module) -> dict[str, Placement]:
    if block.kind == "E":
        return moe_params("mlp", block.mlp)
    if block.kind != "m":
        return {}  # attention and MLP parameters all belong to styled Linears and norms
    return {"mlstm.norm.weight": Shard(0)}  # per head, beside the heads' channels
