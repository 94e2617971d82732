"""Tensor (+ sequence) parallel plan of the ParaRNN family; parallel/tensor.py applies it.

Each block is `x + mixer(norm(x))`; the norm and the residual stream follow the transformer's
sequence-parallel layout (the residual sharded on the sequence between blocks, each mixer's input
all-gathered), and `*` / `-` / `E` layers the transformer's attention / MLP / MoE styles.

The ParaGRU / ParaLSTM layers (`g`, `l`) split by channel groups. The recurrence is diagonal: a
channel's next state depends on its own state and its own three gate pre-activations only, so a
rank that holds whole channels, with all their gates, runs the Newton solve on them with no
communication. in_proj and gate_proj are column-wise (each rank computes its channels of v and
z); the conv weight and bias, B (cell_weight (heads, 3, Dh, Dh): a head's three gates of its
channels together, so Shard(0) hands a rank its heads' gate rows), the gate biases, a and p and
the gated norm's weight are sharded by channel with them; the gated norm normalizes per head, so
whole heads per rank keep it local. out_proj is row-wise and sums the ranks' partial outputs into
the residual stream (reduce-scattered onto the sequence shards under sequence parallelism).

With heads = 1 (a dense B: every channel's gates read every channel; one norm group) B is split
by output channel instead (cell_weight (1, 3, D, D) Shard(2): a rank's rows of all three gates,
each gate split alike, so the gates are never mixed), everything else as above. Two collectives
per layer then join the ranks (cell_layer.py, dense_split.py): the rank's convolved channels are
all-gathered before B (reduce-scattered in the backward pass), and the gated norm's mean square
over all D channels is all-reduced. So tp must divide `heads` when heads > 1, and d_inner always
(the spec's shape_limits).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Placement, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from undertow.models.pararnn.config import CELLS
from undertow.models.transformer.plan import (
    attention_styles,
    mixer_input,
    mlp_styles,
    moe_params,
    moe_styles,
    norm_styles,
    output_projection,
)

# parameter -> the dim that runs over channels (or heads, for B)
_BY_CHANNEL = {"conv_weight": 0, "conv_bias": 0, "cell_weight": 0, "cell_bias": 1, "a": 1, "p": 1, "norm.weight": 0}
_DENSE_BY_OUTPUT = 2  # heads = 1: cell_weight (1, 3, D_out, D_in) split by output channel


def _cell_styles(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    return {
        "mixer": mixer_input(2, sequence_parallel),  # mixer(u, doc_ids)
        "mixer.in_proj": ColwiseParallel(),
        "mixer.gate_proj": ColwiseParallel(),
        "mixer.out_proj": output_projection(sequence_parallel),
    }


def block_styles(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    if block.kind in CELLS:
        mixer = _cell_styles(sequence_parallel)
    elif block.kind == "*":
        mixer = attention_styles("mixer", sequence_parallel)
    elif block.kind == "E":
        mixer = moe_styles("mixer", sequence_parallel)
    else:
        mixer = mlp_styles("mixer", block.mixer, sequence_parallel)
    return {**norm_styles(["norm"], sequence_parallel), **mixer}


def block_params(block: nn.Module) -> dict[str, Placement]:
    if block.kind == "E":
        return moe_params("mixer", block.mixer)
    if block.kind not in CELLS:
        return {}  # attention and MLP parameters all belong to styled Linears and norms
    present = dict(block.mixer.named_parameters())  # conv_bias without cfg.conv_bias, p for the GRU
    dims = dict(_BY_CHANNEL, cell_weight=0 if block.mixer.cfg.heads > 1 else _DENSE_BY_OUTPUT)
    return {f"mixer.{name}": Shard(dim) for name, dim in dims.items() if name in present}
