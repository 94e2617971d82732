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
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Placement, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from undertow.models.transformer.plan import mixer_input, mlp_styles, norm_styles, output_projection

_BY_HEAD = ("q", "k", "v", "igate", "fgate", "ogate")


def block_styles(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    return {
        **norm_styles(["norm_mlstm", "norm_ffn"], sequence_parallel),
        "mlstm": mixer_input(2, sequence_parallel),  # mlstm(x, doc_ids)
        **{f"mlstm.{name}": ColwiseParallel() for name in _BY_HEAD},
        "mlstm.out_proj": output_projection(sequence_parallel),
        **mlp_styles("ffn", block.ffn, sequence_parallel),
    }


def block_params(block: nn.Module) -> dict[str, Placement]:
    return {"mlstm.norm.weight": Shard(0)}  # per head, beside the heads' channels
