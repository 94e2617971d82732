"""Tensor (+ sequence) parallel plan of the Titans family; parallel/tensor.py applies it.

Split by heads: each rank holds its attention heads and its memory heads (heads never interact, in
the attention or inside the memory), so q, k, v and the memory's gate projections (theta, eta, alpha,
gamma) are column-wise and M_0's (H, Din, Dout) tensors Shard(0); the rank runs the memory kernel on
its heads alone. The projections back to d_model (attention o_proj, memory out_proj) are row-wise
with their outputs all-reduced to whole tensors: the blocks reuse them at full width inside the
mixing (MAC feeds the memory's answers to the attention's key projection and the attention output
to the memory; MAG normalises both branches), so the mixing part of a block is one module whose
input is all-gathered from the sequence shards and whose output each rank cuts back to its shard
(MAC/MAG: `mixer`; MAL: `mem` and `attn`, each its own residual branch). Inside it, the replicated
norms of MAG work on whole tensors (equal gradients on every rank) and its gate_out is column-wise
with an all-gathered output. The persistent tokens are replicated and enter through the sharded k/v
projections. The SwiGLU FFN (or MoE FFN) and the block norms follow the transformer's styles.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleInputOutput, RowwiseParallel

from undertow.models.transformer.plan import mlp_styles, moe_params, moe_styles, norm_styles, residual_layout


def whole_in_shard_out(n_args: int, sequence_parallel: bool) -> PrepareModuleInputOutput:
    """A module called with `n_args` positional arguments, the first (B, T, d_model): it gets that input
    whole (a plain tensor), and its whole output (B, T, d_model) leaves in the residual stream's layout."""
    residual, rest = residual_layout(sequence_parallel), (None,) * (n_args - 1)
    return PrepareModuleInputOutput(input_layouts=(residual, *rest), desired_input_layouts=(Replicate(), *rest),
                                    use_local_input=True, output_layouts=(Replicate(),),
                                    desired_output_layouts=(residual,), use_local_output=True)


def replicated() -> PrepareModuleInputOutput:
    """A module with replicated weights computing the same whole tensor on every rank (plain in and out)."""
    return PrepareModuleInputOutput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                    output_layouts=(Replicate(),), desired_output_layouts=(Replicate(),),
                                    use_local_output=True)


def memory_styles(prefix: str, mem: nn.Module) -> dict[str, ParallelStyle]:
    names = ["q_proj", "k_proj", "v_proj", "theta_proj", "eta_proj", "alpha_proj"]
    names += ["gamma_proj"] if mem.gamma_proj is not None else []
    return {**{f"{prefix}.{name}": ColwiseParallel() for name in names},
            f"{prefix}.out_proj": RowwiseParallel(output_layouts=Replicate())}


def attention_styles(prefix: str) -> dict[str, ParallelStyle]:
    return {**{f"{prefix}.attn.{name}": ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")},
            f"{prefix}.attn.o_proj": RowwiseParallel(output_layouts=Replicate())}


def block_styles(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    ffn = moe_styles("ffn", sequence_parallel) if block.is_moe else mlp_styles("ffn", block.ffn, sequence_parallel)
    if block.kind == "mal":
        return {**norm_styles(["norm_mem", "norm", "norm_ffn"], sequence_parallel), **ffn,
                "mem": whole_in_shard_out(2, sequence_parallel), **memory_styles("mem", block.mem),
                "attn": whole_in_shard_out(6, sequence_parallel), **attention_styles("attn")}
    styles = {**norm_styles(["norm", "norm_ffn"], sequence_parallel), **ffn,
              "mixer": whole_in_shard_out(6, sequence_parallel), **memory_styles("mixer.mem", block.mixer.mem),
              **attention_styles("mixer.attn")}
    if block.kind == "mag":
        styles.update({"mixer.norm_y": replicated(), "mixer.norm_m": replicated(),
                       "mixer.gate_out": ColwiseParallel(output_layouts=Replicate())})
    return styles


def block_params(block: nn.Module) -> dict[str, Placement]:
    """M_0 by heads; the persistent tokens, MAG's inner norms and an MoE FFN's weights replicated."""
    prefix = "" if block.kind == "mal" else "mixer."
    mem = block.mem if block.kind == "mal" else block.mixer.mem
    params = {f"{prefix}mem.memory.{i}": Shard(0) for i in range(len(mem.memory))}
    params[f"{prefix}attn.persistent"] = Replicate()
    if block.kind == "mag":
        params.update({"mixer.norm_y.weight": Replicate(), "mixer.norm_m.weight": Replicate()})
    if block.is_moe:
        params.update(moe_params("ffn", block.ffn))
    return params
