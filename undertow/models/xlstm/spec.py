"""Registry entry of the xLSTM family: training FLOPs per token, per-layer costs, shape limits, state.

Training FLOPs are 3x the forward (backward = 2x forward). Forward FLOPs per token of one mLSTM
block, H heads of Dqk / Dv channels, chunk Q = min(chunk_size, seq_len):
  matmuls   2 per weight: q, k (d x qk_dim), v, ogate (d x v_dim), igate, fgate (d x H), out_proj
            (v_dim x d), the SwiGLU's gate, up, down (3 d x hidden); elementwise work not counted
  mLSTM     the chunkwise form: 4 H Dqk Dv (the chunk states' k v^T and their readout q C)
            + H Q (Dqk + Dv) inside a chunk (causal halves of q k^T and of its product with v)
plus the LM head, 2 * d_model * vocab_size.
"""

from __future__ import annotations

from undertow.models.model_spec import ModelSpec
from undertow.models.xlstm import hf, plan
from undertow.models.xlstm.config import XLSTMConfig
from undertow.models.xlstm.model import XLSTMLM


def block_matmul_params(cfg: XLSTMConfig) -> int:
    """Weights of one block's projections (the matmuls; not norms or gate biases)."""
    d = cfg.d_model
    return d * (2 * cfg.qk_dim + 2 * cfg.v_dim + 2 * cfg.n_heads) + cfg.v_dim * d + 3 * d * cfg.hidden


def block_forward_flops(cfg: XLSTMConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one block (see the module docstring)."""
    dqk, dv, h = cfg.qk_head_dim, cfg.v_head_dim, cfg.n_heads
    chunk = min(cfg.chunk_size, seq_len)
    return 2.0 * block_matmul_params(cfg) + 4.0 * h * dqk * dv + h * chunk * (dqk + dv)


def layer_cost(cfg: XLSTMConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each block, in order (for the pipeline split)."""
    return [3.0 * block_forward_flops(cfg, seq_len) for _ in cfg.pattern]


def flops_per_token(cfg: XLSTMConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the whole model, LM head included."""
    return sum(layer_cost(cfg, seq_len)) + 6.0 * cfg.d_model * cfg.vocab_size


def shape_limits(cfg: XLSTMConfig) -> list[tuple[str, str, int]]:
    """Tensor parallelism splits the mLSTM heads (q, k, v, gates, per-head norm) and the SwiGLU's
    hidden units."""
    return [("tp", "n_heads", cfg.n_heads), ("tp", "ffn_hidden", cfg.hidden)]


def state_elements(cfg: XLSTMConfig) -> list[int]:
    """Per block, float32 elements of one sequence's mLSTM state: per head C (Dqk x Dv), n (Dqk), m."""
    per_block = cfg.n_heads * (cfg.qk_head_dim * cfg.v_head_dim + cfg.qk_head_dim + 1)
    return [per_block for _ in cfg.pattern]


SPEC = ModelSpec(
    name="xlstm",
    config_cls=XLSTMConfig,
    model_cls=XLSTMLM,
    flops_per_token=flops_per_token,
    layer_cost=layer_cost,
    plan=plan,
    hf_adapter=hf,
    shape_limits=shape_limits,
    state_elements=state_elements,
)
