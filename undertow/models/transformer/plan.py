"""Tensor (+ sequence) parallel plan of the transformer; parallel/tensor.py applies it.

Attention is split by heads (q/k/v column-wise, o row-wise; grouped-query attention needs tp to
divide the key/value heads too), MLPs column-wise (SwiGLU's gate and up, the GELU MLP's fc1) then
row-wise (down, fc2), so each rank holds a slice of the hidden units. With sequence parallelism
(Megatron-LM's) the residual stream and the RMSNorms are sharded on the sequence between blocks:
each mixer's input is all-gathered to the whole sequence (so attention, its document mask and RoPE
see every position), and its output projection reduce-scatters back to sequence shards.

The styles for attention, the MLPs and a mixer's input are shared with the families that contain
these layers (the Mamba hybrids' `*` and `-`).

A plan module offers (duck-typed, see parallel/tensor.py):
    block_styles(block, sequence_parallel) -> {submodule name in the block: ParallelStyle}
    block_params(block) -> {parameter name in the block: Placement}   parameters no style owns
The sizes tp must divide are the spec's `shape_limits` (spec.py).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
)

from undertow.models.common.mlp import GeluMLP, SwiGLU


def residual_layout(sequence_parallel: bool) -> Placement:
    """How the residual stream (B, T, d_model) lies between blocks: sharded on T, or whole."""
    return Shard(1) if sequence_parallel else Replicate()


def norm_styles(names: list[str], sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Block RMSNorms: computed on the sequence shards (weights replicated) under sequence
    parallelism; otherwise left as plain modules, computed whole on every rank."""
    return {name: SequenceParallel() for name in names} if sequence_parallel else {}


def mixer_input(n_args: int, sequence_parallel: bool) -> PrepareModuleInput:
    """A mixer called with `n_args` positional arguments, the first its input (B, T, d_model): that
    input becomes a replicated DTensor of the whole sequence (all-gathered under sequence
    parallelism); the others (RoPE tables, document ids, ...) stay plain, whole-sequence tensors."""
    rest = (None,) * (n_args - 1)
    return PrepareModuleInput(
        input_layouts=(residual_layout(sequence_parallel), *rest), desired_input_layouts=(Replicate(), *rest)
    )


def output_projection(sequence_parallel: bool) -> RowwiseParallel:
    """A mixer's last projection: sums the ranks' partial outputs back into the residual stream."""
    return RowwiseParallel(output_layouts=residual_layout(sequence_parallel))


def attention_styles(prefix: str, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """`Attention` at `prefix`, called as attn(x, cos, sin, doc_ids, cu_seqlens, max_seqlen)."""
    return {
        prefix: mixer_input(6, sequence_parallel),
        f"{prefix}.q_proj": ColwiseParallel(),
        f"{prefix}.k_proj": ColwiseParallel(),
        f"{prefix}.v_proj": ColwiseParallel(),
        f"{prefix}.o_proj": output_projection(sequence_parallel),
    }


# Per MLP class: its input projections (split by hidden unit) and its output projection.
_MLP_PROJECTIONS = {SwiGLU: (("gate_proj", "up_proj"), "down_proj"), GeluMLP: (("fc1",), "fc2")}


def mlp_styles(prefix: str, mlp: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The MLP `mlp` (SwiGLU or GeluMLP) at `prefix`, called as mlp(x): input projections column-wise,
    the elementwise activation on each rank's hidden units, the output projection row-wise."""
    if type(mlp) not in _MLP_PROJECTIONS:
        raise TypeError(f"no tensor-parallel styles for the MLP {type(mlp).__name__}; known: "
                        f"{[cls.__name__ for cls in _MLP_PROJECTIONS]}")
    inputs, output = _MLP_PROJECTIONS[type(mlp)]
    return {
        prefix: mixer_input(1, sequence_parallel),
        **{f"{prefix}.{name}": ColwiseParallel() for name in inputs},
        f"{prefix}.{output}": output_projection(sequence_parallel),
    }


def moe_styles(prefix: str, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """An MoE layer (models/moe) at `prefix`, called as moe(x, router_state, router_gru). Every rank
    routes the whole sequence's tokens on plain tensors (its weights are replicated DTensors,
    `moe_params`, whose local values it uses: equal gradients on every rank; parallel/expert.py
    then splits the experts' width over the tp ranks and sums their partial outputs); the input is
    all-gathered from the sequence shards, and each rank keeps its shard of the output.
    The RMoE router state is whole on every rank and passes untouched."""
    residual = residual_layout(sequence_parallel)
    return {prefix: PrepareModuleInputOutput(
        input_layouts=(residual, None, None), desired_input_layouts=(Replicate(), None, None),
        use_local_input=True, output_layouts=(Replicate(), None), desired_output_layouts=(residual, None),
        use_local_output=True)}


def moe_params(prefix: str, moe: nn.Module) -> dict[str, Placement]:
    """Every weight of the MoE layer at `prefix` (experts, router, shared expert): replicated."""
    return {f"{prefix}.{name}": Replicate() for name, _ in moe.named_parameters()}


def block_styles(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    mlp = moe_styles("mlp", sequence_parallel) if block.is_moe else mlp_styles("mlp", block.mlp, sequence_parallel)
    return {
        **norm_styles(["attn_norm", "mlp_norm"], sequence_parallel),
        **attention_styles("attn", sequence_parallel),
        **mlp,
    }


def block_params(block: nn.Module) -> dict[str, Placement]:
    # every other parameter belongs to a Linear or an RMSNorm that a style places
    return moe_params("mlp", block.mlp) if block.is_moe else {}
