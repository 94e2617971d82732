"""Registry entry of the ParaRNN family: training FLOPs per token, per-layer costs, shape limits, state.

Training FLOPs are 3x the forward (backward = 2x forward). Forward FLOPs per token of one block:
  matmuls   2 per weight of every projection (elementwise work of norms and SwiGLU not counted):
            g, l  in_proj, gate_proj (d x D each), B (3 D Dh, block-diagonal), out_proj (D x d)
            *     q, o (d x d), k, v (d x kv_heads head_dim);  -  SwiGLU 3 d hidden
            E     the ACTIVE weights: top_k experts, the shared expert, the router (and RMoE's GRU)
  conv      2 * conv_width per channel (g, l)
  Newton    per channel, with `iterations` = k: the initial guess and the final residual evaluate
            the cell once each, every iteration evaluates it with its Jacobian, forms the residual
            and solves the linear recurrence by the chunked scan:
                (k + 2) * CELL + k * (JACOBIAN + SCAN + S) + S      (S: state rows, 1 GRU, 2 LSTM)
            CELL, JACOBIAN and SCAN are counts of the elementwise operations of reference.py,
            newton.py and scan.py (a sigmoid or tanh counted as one)
  scores    4 * seq_len * d_model for `*` (Q K^T and A V, no causal saving, like the transformer)
plus the LM head, 2 * d_model * vocab_size. The Newton terms are what make the pipeline split and
the MFU count the iterations; they are small beside the matmuls at the usual widths.
"""

from __future__ import annotations

from undertow.models.common.flops import lm_training_flops, pattern_layer_costs
from undertow.models.model_spec import ModelSpec
from undertow.models.pararnn import hf, plan
from undertow.models.pararnn.config import CELLS, ParaRNNConfig
from undertow.models.pararnn.model import ParaRNNLM

STATE_ROWS = {"gru": 1, "lstm": 2}
CELL_FLOPS = {"gru": 14, "lstm": 19}       # one cell evaluation per channel (eqs. G1-G4, L1-L5)
JACOBIAN_FLOPS = {"gru": 14, "lstm": 30}   # its derivative d f / d state beside it
SCAN_FLOPS = {"gru": 6, "lstm": 30}        # chunk solve, transitions and fix-up of one linear recurrence


def newton_flops(cell: str, iterations: int) -> float:
    """Forward FLOPs per channel and token of one Newton solve of `iterations` steps."""
    s = STATE_ROWS[cell]
    return ((iterations + 2) * CELL_FLOPS[cell] + iterations * (JACOBIAN_FLOPS[cell] + SCAN_FLOPS[cell] + s) + s)


def layer_matmul_params(cfg: ParaRNNConfig, kind: str) -> int:
    """Weights of one layer's projections (the matmuls; not convs, norms, a, p or biases)."""
    d, D = cfg.d_model, cfg.d_inner
    if kind in CELLS:
        return 3 * d * D + 3 * D * cfg.head_dim
    if kind == "*":
        head_dim = d // cfg.attn_heads
        return d * head_dim * (2 * cfg.attn_heads + 2 * cfg.kv_heads)
    if kind == "-":
        return 3 * d * cfg.hidden
    if kind == "E":
        return cfg.moe.mlp_active_params(d, cfg.hidden)
    raise ValueError(f"layer kind {kind!r} is unknown; valid: g, l, *, -, E")


def layer_forward_flops(cfg: ParaRNNConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of one layer of `kind` (see the module docstring)."""
    flops = 2.0 * layer_matmul_params(cfg, kind)
    if kind in CELLS:
        flops += cfg.d_inner * (2.0 * cfg.conv_width + newton_flops(CELLS[kind], cfg.iterations))
    elif kind == "*":
        flops += 4.0 * seq_len * cfg.d_model
    return flops


def layer_cost(cfg: ParaRNNConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each layer, in order (for the pipeline split)."""
    return pattern_layer_costs(cfg.layer_pattern, lambda kind: layer_forward_flops(cfg, kind, seq_len))


def flops_per_token(cfg: ParaRNNConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the whole model, LM head included."""
    return lm_training_flops(layer_cost(cfg, seq_len), cfg.d_model, cfg.vocab_size)


def shape_limits(cfg: ParaRNNConfig) -> list[tuple[str, str, int]]:
    """What tensor parallelism splits in each layer kind present: the cell layers' channel groups
    (whole heads of d_inner channels per rank; with heads = 1 the channels, plan.py), attention
    query and key/value heads, the MLP's hidden units, each expert's width (parallel/expert.py)."""
    kinds = set(cfg.layer_pattern)
    limits = []
    if kinds & set(CELLS):
        if cfg.heads > 1:  # whole channel groups per rank; heads = 1 (dense B) splits by output channel
            limits.append(("tp", "heads (the cell layers' channel groups; or heads = 1, a dense input "
                                 "projection split by output channel, for any tp dividing d_inner)", cfg.heads))
        limits.append(("tp", "d_inner (the cell layers' channels)", cfg.d_inner))
    if "*" in kinds:
        limits += [("tp", "attn_heads", cfg.attn_heads), ("tp", "attn_kv_heads", cfg.kv_heads)]
    if "-" in kinds:
        limits.append(("tp", "ffn_hidden", cfg.hidden))
    if "E" in kinds:
        limits.append(cfg.moe.mlp_tp_limit(cfg.hidden))
    return limits


def state_elements(cfg: ParaRNNConfig) -> list[int]:
    """Per layer, float32 elements of one sequence's state: the conv window (D x (K-1)) and the cell
    state (GRU h: D; LSTM c, h: 2 D); attention and MLP layers carry none."""
    window = cfg.conv_width - 1
    return [cfg.d_inner * (window + STATE_ROWS[CELLS[kind]]) if kind in CELLS else 0 for kind in cfg.layer_pattern]


SPEC = ModelSpec(
    name="pararnn",
    config_cls=ParaRNNConfig,
    model_cls=ParaRNNLM,
    flops_per_token=flops_per_token,
    layer_cost=layer_cost,
    plan=plan,
    hf_adapter=hf,  # remote code: transformers has no ParaRNN class (hf.py)
    shape_limits=shape_limits,
    state_elements=state_elements,
)
