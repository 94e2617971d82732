"""Tensor (+ sequence) parallel plan of the recurrent-depth family; parallel/tensor.py applies it.

Sandwich blocks (Huginn's prelude and coda) take the transformer's styles: attention by heads (q,
k, v column-wise with their biases, o row-wise), SwiGLU column- then row-wise, the four RMSNorms on
sequence shards; norm_2 and norm_4 end the block's residual branches, so they hand the residual
stream on as plain local shards (B, T/tp, d), as the transformer's output projections do.

The looped part (the Universal Transformer's ACT loop, Huginn's core) runs on whole plain tensors:
its input is all-gathered from the sequence shards once per forward, the r steps run on the full
sequence on every rank, with each step's attention and MLP matmuls split by heads / hidden units
(the non-sequence-parallel styles: their row-wise outputs all-reduced), and its output goes back to
sequence shards (a local slice, no communication). Its step timing signal, halting masks and sums,
the initial state s_0 and concat(s, e) then need no DTensor layouts; its small parameters (norm
weights, halting unit, adapter) are replicated and read as local tensors inside the loop
(replicated.py). Sequence parallelism thus saves no activation memory inside the loop; it costs
one all-gather and no reduce-scatter per loop, and two all-reduces per block per step (Megatron's
TP without SP).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Placement, Replicate
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleInputOutput, SequenceParallel

from undertow.models.depth.act import ACTLoop
from undertow.models.depth.blocks import SandwichBlock
from undertow.models.depth.core import RecurrentCore
from undertow.models.moe.layer import MoELayer
from undertow.models.transformer.plan import attention_styles, mlp_styles, moe_params, moe_styles, residual_layout


def ffn_styles(prefix: str, mlp: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The SwiGLU's styles, or an MoE layer's (the transformer's moe_styles: replicated weights, the
    experts' width split by parallel/expert.py)."""
    if isinstance(mlp, MoELayer):
        return moe_styles(prefix, sequence_parallel)
    return mlp_styles(prefix, mlp, sequence_parallel)


def sandwich_styles(prefix: str, block: SandwichBlock, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    styles = {**attention_styles(f"{prefix}attn", sequence_parallel),
              **ffn_styles(f"{prefix}mlp", block.mlp, sequence_parallel)}
    if sequence_parallel:
        for name, ends_branch in (("norm_1", False), ("norm_2", True), ("norm_3", False), ("norm_4", True)):
            styles[f"{prefix}{name}"] = SequenceParallel(use_local_output=ends_branch)
    return styles


def loop_io(sequence_parallel: bool) -> PrepareModuleInputOutput:
    """The loop's input (B, T/tp, d) all-gathered into a plain (B, T, d); its output sliced back."""
    residual = residual_layout(sequence_parallel)
    return PrepareModuleInputOutput(input_layouts=(residual,), desired_input_layouts=(Replicate(),),
                                    use_local_input=True, output_layouts=(Replicate(),),
                                    desired_output_layouts=(residual,), use_local_output=True)


def block_styles(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    if isinstance(block, SandwichBlock):
        return sandwich_styles("", block, sequence_parallel)
    if isinstance(block, ACTLoop):
        return {"": loop_io(sequence_parallel), **attention_styles("block.attn", False),
                **ffn_styles("block.mlp", block.block.mlp, False)}
    if isinstance(block, RecurrentCore):
        styles = {"": loop_io(sequence_parallel)}
        for i, inner in enumerate(block.blocks):
            styles.update(sandwich_styles(f"blocks.{i}.", inner, False))
        return styles
    raise TypeError(f"no tensor-parallel styles for {type(block).__name__}")


def block_params(block: nn.Module) -> dict[str, Placement]:
    """The loop's parameters no style owns (norm weights, halting unit, adapter, MoE layers): replicated;
    a sandwich block's MoE layer too."""
    if isinstance(block, SandwichBlock):
        return moe_params("mlp", block.mlp) if isinstance(block.mlp, MoELayer) else {}
    styled = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return {name: Replicate() for name, _ in block.named_parameters()
            if not any(f"{part}." in name for part in styled)}
