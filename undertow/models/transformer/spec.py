"""Registry entry of the baseline transformer."""

from undertow.models.model_spec import ModelSpec
from undertow.models.transformer import hf, plan
from undertow.models.transformer.config import TransformerConfig
from undertow.models.transformer.model import TransformerLM


def mlp_active_params(cfg: TransformerConfig) -> int:
    """Weights one token's MLP multiplies by: the SwiGLU, or with MoE its top_k experts, the shared
    expert and the router (the RMoE GRU too: it runs once per layer)."""
    if not cfg.moe.enabled:
        return 3 * cfg.d_model * cfg.hidden
    _, active = cfg.moe.layer_params(cfg.d_model, cfg.hidden)
    return active + cfg.moe.shared_router_params()


def matmul_params(cfg: TransformerConfig) -> int:
    """Parameters that take part in matmuls per token (all but the embedding lookup and norms); with
    MoE the ACTIVE ones (top_k experts of every layer)."""
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    return cfg.n_layers * (attn + mlp_active_params(cfg)) + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 * matmul params + 12 * layers * d_model * seq_len
    for the attention scores and values (forward + backward, without causal savings)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def layer_cost(cfg: TransformerConfig, seq_len: int) -> list[float]:
    per_layer = 6.0 * (matmul_params(cfg) - cfg.d_model * cfg.vocab_size) / cfg.n_layers
    return [per_layer + 12.0 * cfg.d_model * seq_len] * cfg.n_layers


def shape_limits(cfg: TransformerConfig) -> list[tuple[str, str, int]]:
    """Tensor parallelism splits query and key/value heads and the SwiGLU hidden units (MoE layers:
    each expert's width, parallel/expert.py)."""
    heads = [("tp", "n_heads", cfg.n_heads), ("tp", "n_kv_heads", cfg.kv_heads)]
    if cfg.moe.enabled:
        return heads + [("tp", "the expert width (model.moe.expert_hidden)", cfg.moe.hidden(cfg.hidden))]
    return heads + [("tp", "ffn_hidden", cfg.hidden)]


SPEC = ModelSpec(
    name="transformer",
    config_cls=TransformerConfig,
    model_cls=TransformerLM,
    flops_per_token=flops_per_token,
    layer_cost=layer_cost,
    plan=plan,
    hf_adapter=hf,
    shape_limits=shape_limits,
)
