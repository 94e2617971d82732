"""Registry entry of the xLSTM family: training FLOPs per token, per-layer costs, shape limits, state.

Training FLOPs are 3x the forward (backward = 2x forward). Forward FLOPs per token of one block:
  matmuls   2 per weight of every projection (elementwise work, norms and gate biases not counted):
            m  q, k (d x qk_dim), v, ogate (d x v_dim), igate, fgate (d x H), out_proj, SwiGLU 3 d hidden
            s  4 block-diagonal gate projections (d x Dh each) and R (4 d Dh, once per token), the
               gated GeLU FFN 3 d slstm_ffn_hidden
            M  up_a, up_z (d x E), q, k, v (E x up_qkv_block each), igate, fgate (3E x H), down (E x d)
            *  q, o (d x d), k, v (d x kv_heads head_dim);  -  SwiGLU 3 d hidden
  mLSTM     the chunkwise form: 4 H Dqk Dv (chunk states k v^T and their readout q C) + H Q (Dqk + Dv)
            inside a chunk of Q = min(chunk_size, seq_len) positions (m; M with Dqk = Dv = E / H)
  conv      2 * conv_kernel per convolved channel (s: d, M: E)
  scores    4 * seq_len * d_model for `*` (Q K^T and A V, no causal saving, like the transformer)
plus the LM head, 2 * d_model * vocab_size.
"""

from __future__ import annotations

from undertow.models.common.flops import lm_training_flops, pattern_layer_costs
from undertow.models.model_spec import ModelSpec
from undertow.models.xlstm import hf, plan
from undertow.models.xlstm.config import XLSTMConfig
from undertow.models.xlstm.model import XLSTMLM


def block_matmul_params(cfg: XLSTMConfig, kind: str = "m") -> int:
    """Weights of one `kind` block's projections (the matmuls; R counted for s)."""
    d = cfg.d_model
    if kind == "m":
        return d * (2 * cfg.qk_dim + 2 * cfg.v_dim + 2 * cfg.n_heads) + cfg.v_dim * d + 3 * d * cfg.hidden
    if kind == "s":
        return 8 * d * (d // cfg.slstm_heads) + 3 * d * cfg.slstm_ffn_hidden
    if kind == "M":
        e = cfg.up_inner
        return 3 * e * d + 3 * e * cfg.up_qkv_block + 6 * e * cfg.up_heads
    if kind == "*":
        return 2 * d * d + 2 * d * (d // cfg.q_heads) * cfg.kv_heads
    if kind == "-":
        return 3 * d * cfg.hidden
    if kind == "E":  # the ACTIVE weights: top_k experts, the shared expert, the router (and RMoE's GRU)
        _, active = cfg.moe.layer_params(d, cfg.hidden)
        return active + cfg.moe.shared_router_params()
    raise ValueError(f"layer kind {kind!r} is unknown; valid: m, s, M, *, -, E")


def mlstm_flops(heads: int, dqk: int, dv: int, chunk: int) -> float:
    return 4.0 * heads * dqk * dv + heads * chunk * (dqk + dv)


def block_forward_flops(cfg: XLSTMConfig, seq_len: int, kind: str = "m") -> float:
    """Forward FLOPs per token of one `kind` block (see the module docstring)."""
    flops = 2.0 * block_matmul_params(cfg, kind)
    chunk = min(cfg.chunk_size, seq_len)
    if kind == "m":
        flops += mlstm_flops(cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim, chunk)
    elif kind == "s":
        flops += 2.0 * cfg.conv_kernel * cfg.d_model
    elif kind == "M":
        head_dim = cfg.up_inner // cfg.up_heads
        flops += 2.0 * cfg.conv_kernel * cfg.up_inner + mlstm_flops(cfg.up_heads, head_dim, head_dim, chunk)
    elif kind == "*":
        flops += 4.0 * seq_len * cfg.d_model
    return flops


def layer_cost(cfg: XLSTMConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each layer, in order (for the pipeline split)."""
    return pattern_layer_costs(cfg.pattern, lambda kind: block_forward_flops(cfg, seq_len, kind))


def flops_per_token(cfg: XLSTMConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the whole model, LM head included."""
    return lm_training_flops(layer_cost(cfg, seq_len), cfg.d_model, cfg.vocab_size)


def shape_limits(cfg: XLSTMConfig) -> list[tuple[str, str, int]]:
    """What tensor parallelism splits in each block kind present: the mLSTM heads and the SwiGLU's
    hidden units (m), attention query and key/value heads (*), the MLP's hidden units (-), the sLSTM
    heads and its FFN's hidden units (s), the up-projection mLSTM's heads (M)."""
    kinds = set(cfg.pattern)
    limits = [("tp", "n_heads", cfg.n_heads)] if "m" in kinds else []
    if kinds & {"m", "-"}:
        limits.append(("tp", "ffn_hidden", cfg.hidden))
    if "*" in kinds:
        limits += [("tp", "attn_heads", cfg.q_heads), ("tp", "attn_kv_heads", cfg.kv_heads)]
    if "E" in kinds:  # each expert's width (parallel/expert.py)
        limits.append(("tp", "the expert width (model.moe.expert_hidden)", cfg.moe.hidden(cfg.hidden)))
    if "s" in kinds:  # sLSTM heads (conv, gates, R, GroupNorm per head), its gated FFN's hidden units
        limits += [("tp", "slstm_heads", cfg.slstm_heads), ("tp", "the sLSTM FFN width", cfg.slstm_ffn_hidden)]
    if "M" in kinds:  # up-projection mLSTM heads (q/k/v blocks divide a head: a rank's channels hold whole ones)
        limits.append(("tp", "up_heads", cfg.up_heads))
    return limits


def state_elements(cfg: XLSTMConfig) -> list[int]:
    """Per block, float32 elements of one sequence's recurrent state: m the mLSTM's (per head C
    (Dqk x Dv), n (Dqk), m); s the conv window (d x (K-1)) and (y, c, n, m) (4 d); M the conv window
    (E x (K-1)) and its mLSTM's; attention and MLP layers carry none."""
    window = cfg.conv_kernel - 1
    up_head = cfg.up_inner // cfg.up_heads
    per_kind = {
        "m": cfg.n_heads * (cfg.qk_head_dim * cfg.v_head_dim + cfg.qk_head_dim + 1),
        "s": cfg.d_model * (window + 4),
        "M": cfg.up_inner * window + cfg.up_heads * (up_head * up_head + up_head + 1),
    }
    return [per_kind.get(kind, 0) for kind in cfg.pattern]


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
