"""Registry entry of the Titans family: training FLOPs per token, per-layer costs, shape limits, state.

Training FLOPs are 3x the forward. Forward FLOPs per token of one block (d = d_model, H memory heads
with widths Din_l x Dout_l per layer of the memory network, C = chunk_size, P persistent tokens):
  matmuls   2 per weight: attention q, k, v, o (4 d^2); memory q, k, v (3 d^2), gates (3-4 d H), out
            (d^2); SwiGLU 3 d hidden (MoE: the ACTIVE weights, top_k experts, shared expert, router
            and RMoE's GRU); MAG's gate_out d^2; MAC also projects the memory's answers (k, v:
            2 d^2; out: d^2) and reads the memory at the segment's queries (2 sum Din Dout per head)
  memory    per head and layer of the memory network: its forward and hand-written backward at the
            chunk-start weights (6 Din Dout), the readout against the chunk-entry weights and momentum
            (4 Din Dout), the chunk-local mixing (4 C (Din + Dout)) and the chunk-end state (4 Din Dout / C
            per token, counted as 4 Din Dout: an upper bound)
  scores    4 d per key seen: MAC P + segment_len (the segment's answers and tokens, causal: on average
            half of 2 segment_len), MAG/MAL P + window
plus the LM head, 2 d vocab_size.
"""

from __future__ import annotations

from undertow.models.common.flops import lm_training_flops, pattern_layer_costs
from undertow.models.model_spec import ModelSpec
from undertow.models.titans import hf, plan
from undertow.models.titans.config import TitansConfig
from undertow.models.titans.model import TitansLM


def memory_weights(cfg: TitansConfig) -> int:
    """Weights of one head's memory network, sum_l Din_l Dout_l."""
    dims = cfg.mem_dims
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def block_forward_flops(cfg: TitansConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one block (see the module docstring)."""
    d, H = cfg.d_model, cfg.mem_heads
    gates = 4 if cfg.omega_window > 1 else 3
    params = 4 * d * d + 4 * d * d + gates * d * H + cfg.moe.mlp_active_params(d, cfg.hidden)
    dims = cfg.mem_dims
    memory = H * sum(14 * a * b + 4 * cfg.chunk_size * (a + b) for a, b in zip(dims[:-1], dims[1:]))
    if cfg.variant == "mac":
        params += 3 * d * d
        memory += 2 * H * memory_weights(cfg)
        keys = cfg.persistent_tokens + min(cfg.segment_len, seq_len)
    else:
        params += d * d if cfg.variant == "mag" else 0
        keys = cfg.persistent_tokens + min(cfg.window, seq_len)
    return 2.0 * params + memory + 4.0 * d * keys


def layer_cost(cfg: TitansConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each block, in order (for the pipeline split)."""
    return pattern_layer_costs([cfg.variant] * cfg.n_layers, lambda kind: block_forward_flops(cfg, seq_len))


def flops_per_token(cfg: TitansConfig, seq_len: int) -> float:
    return lm_training_flops(layer_cost(cfg, seq_len), cfg.d_model, cfg.vocab_size)


def shape_limits(cfg: TitansConfig) -> list[tuple[str, str, int]]:
    """Tensor parallelism splits the attention heads, the memory heads and the SwiGLU's hidden units
    (plan.py; an MoE FFN: each expert's width, parallel/expert.py). Context parallelism's limit depends
    on the row length: TitansConfig.context_limits."""
    return [("tp", "n_heads", cfg.n_heads), ("tp", "mem_heads", cfg.mem_heads), cfg.moe.mlp_tp_limit(cfg.hidden)]


def state_elements(cfg: TitansConfig) -> list[int]:
    """Per block, float32 elements of one sequence's memory state: weights and momentum of every head
    (and the Omega window's c - 1 keys, values and gates)."""
    window = (cfg.omega_window - 1) * cfg.mem_heads * (2 * cfg.mem_head_dim + 1)
    return [2 * cfg.mem_heads * memory_weights(cfg) + window] * cfg.n_layers


SPEC = ModelSpec(
    name="titans",
    config_cls=TitansConfig,
    model_cls=TitansLM,
    flops_per_token=flops_per_token,
    layer_cost=layer_cost,
    plan=plan,
    hf_adapter=hf,
    shape_limits=shape_limits,
    state_elements=state_elements,
)
