"""Registry entry of the Mamba family: training FLOPs per token and per-layer costs.

Training FLOPs are 3x the forward (backward = 2x forward). Forward FLOPs per token of one layer:
  matmuls   2 per weight of every projection (a multiply and an add); the MLPs' elementwise
            activations (SiLU and product, GELU) are not counted
  conv      2 * d_conv per convolved channel
  m scan    6 * d_inner * d_state (decay, input outer product, state update, readout)
  M SSD     the chunked form: 4 * d_inner * d_state (chunk states and their readout)
            + Q * (ngroups * d_state + d_inner) inside a chunk of Q = min(chunk_size, seq_len)
            positions (causal halves of C B^T and of its product with x)
  * scores  4 * seq_len * n_heads * head_dim (Q K^T and A V, no causal saving, like the transformer)
plus the LM head, 2 * d_model * vocab_size.
"""

from __future__ import annotations

from undertow.models.common.flops import lm_training_flops, pattern_layer_costs
from undertow.models.common.mlp import swiglu_hidden
from undertow.models.mamba import hf, plan
from undertow.models.mamba.config import MambaConfig
from undertow.models.mamba.model import MambaLM
from undertow.models.model_spec import ModelSpec


def layer_matmul_params(cfg: MambaConfig, kind: str) -> int:
    """Weights of one layer's projections (the matmuls; not convs, norms, A, D or biases)."""
    d, di, n = cfg.d_model, cfg.d_inner, cfg.d_state
    if kind == "m":
        return 2 * d * di + di * (cfg.rank + 2 * n) + cfg.rank * di + di * d
    if kind == "M":
        return d * (2 * di + 2 * cfg.ngroups * n + cfg.nheads) + di * d
    if kind == "*":
        head_dim = d // cfg.n_heads
        kv_heads = cfg.n_kv_heads or cfg.n_heads
        return d * head_dim * (2 * cfg.n_heads + 2 * kv_heads)
    if kind == "-":  # SwiGLU: gate, up, down; GELU MLP: fc1, fc2
        return (2 if cfg.mlp == "gelu" else 3) * d * cfg.hidden
    if kind == "E":  # the ACTIVE weights: top_k experts, the shared expert, the router (and RMoE's GRU)
        _, active = cfg.moe.layer_params(d, swiglu_hidden(d, cfg.multiple_of))
        return active + cfg.moe.shared_router_params()
    raise ValueError(f"layer kind {kind!r} is unknown; valid: m, M, *, -, E")


def layer_forward_flops(cfg: MambaConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of one layer of `kind` (see the module docstring)."""
    flops = 2.0 * layer_matmul_params(cfg, kind)
    di, n = cfg.d_inner, cfg.d_state
    if kind == "m":
        flops += 2.0 * cfg.d_conv * di + 6.0 * di * n
    elif kind == "M":
        gn = cfg.ngroups * n
        chunk = min(cfg.chunk_size, seq_len)
        flops += 2.0 * cfg.d_conv * (di + 2 * gn) + 4.0 * di * n + chunk * (gn + di)
    elif kind == "*":
        flops += 4.0 * seq_len * cfg.d_model
    return flops


def layer_cost(cfg: MambaConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each layer, in order (for the pipeline split)."""
    return pattern_layer_costs(cfg.layer_pattern, lambda kind: layer_forward_flops(cfg, kind, seq_len))


def flops_per_token(cfg: MambaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the whole model, LM head included."""
    return lm_training_flops(layer_cost(cfg, seq_len), cfg.d_model, cfg.vocab_size)


def shape_limits(cfg: MambaConfig) -> list[tuple[str, str, int]]:
    """What tensor parallelism splits in each layer kind present: Mamba-1 channels, Mamba-2 heads
    and the groups sharing B/C, attention query and key/value heads, the MLP's hidden units."""
    kinds = set(cfg.layer_pattern)
    limits = [("tp", "d_inner", cfg.d_inner)] if "m" in kinds else []
    if "M" in kinds:
        limits += [("tp", "nheads", cfg.nheads), ("tp", "ngroups", cfg.ngroups)]
    if "*" in kinds:
        limits += [("tp", "n_heads", cfg.n_heads), ("tp", "n_kv_heads", cfg.n_kv_heads or cfg.n_heads)]
    if "-" in kinds:
        limits.append(("tp", "ffn_hidden", cfg.hidden))
    if "E" in kinds:  # each expert's width (parallel/expert.py)
        width = cfg.moe.hidden(swiglu_hidden(cfg.d_model, cfg.multiple_of))
        limits.append(("tp", "the expert width (model.moe.expert_hidden)", width))
    return limits


def state_elements(cfg: MambaConfig) -> list[int]:
    """Per layer, float32 elements of one sequence's state: conv window (d_conv - 1 steps of the
    convolved channels) + SSM state (Mamba-1: d_inner x d_state; Mamba-2: nheads x headdim x d_state)."""
    window = cfg.d_conv - 1
    per_kind = {
        "m": cfg.d_inner * (window + cfg.d_state),
        "M": (cfg.d_inner + 2 * cfg.ngroups * cfg.d_state) * window + cfg.d_inner * cfg.d_state,
    }
    return [per_kind.get(kind, 0) for kind in cfg.layer_pattern]


SPEC = ModelSpec(
    name="mamba",
    config_cls=MambaConfig,
    model_cls=MambaLM,
    flops_per_token=flops_per_token,
    layer_cost=layer_cost,
    plan=plan,
    hf_adapter=hf,
    shape_limits=shape_limits,
    state_elements=state_elements,
)
