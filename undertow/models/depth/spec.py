"""Registry entry of the recurrent-depth family: FLOPs per token at the expected depth (the planner,
the pipeline split) and at each training step's own draw (the trainer's MFU), per-layer costs,
tensor-parallel limits.

Forward FLOPs per token of one block: 2 per weight of its projections (q, k, v, o, SwiGLU's gate,
up, down; with MoE the active weights: top_k experts, shared expert, router) + 4 * seq_len *
d_model for attention's scores and values (no causal saving, like the transformer's count).
Training counts 3x the forward for steps with gradients and 1x for steps under no_grad:
  ut      the ACT loop runs all max_steps steps on every position (static shapes: halted positions
          are masked, not skipped), each with gradients: 3 * max_steps * (block + halting unit)
  huginn  prelude and coda blocks 3x; the core E[r - k] no-grad steps 1x and E[k] grad steps 3x,
          each step n_core blocks + the adapter (2 * 2 d^2), expectations over the depth
          distribution (a fixed-seed sample of draw_depth)
plus the LM head, 6 * d_model * vocab_size.
"""

from __future__ import annotations

import functools

from undertow.models.depth import hf, plan
from undertow.models.depth.config import DepthConfig
from undertow.models.depth.depth import draw_depth
from undertow.models.depth.model import DepthLM
from undertow.models.model_spec import ModelSpec

_SAMPLES = 2048  # draws averaged for the expected depth


def block_forward_flops(cfg: DepthConfig, seq_len: int) -> float:
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    return 2.0 * (attn + cfg.moe.mlp_active_params(cfg.d_model, cfg.hidden)) + 4.0 * seq_len * cfg.d_model


@functools.lru_cache(maxsize=64)
def _expected_split(distribution: str, mean: float, sigma: float, max_depth: int, k: int, seed: int) -> tuple:
    cfg = DepthConfig(depth_distribution=distribution, mean_depth=mean, depth_sigma=sigma, max_depth=max_depth,
                      backprop_depth=k, depth_seed=seed)
    draws = [draw_depth(cfg, step) for step in range(_SAMPLES if distribution != "fixed" else 1)]
    return sum(d.no_grad for d in draws) / len(draws), sum(d.grad for d in draws) / len(draws)


def expected_steps(cfg: DepthConfig) -> tuple[float, float]:
    """(E[steps without gradient], E[steps with gradient]) of one training step of the core."""
    return _expected_split(cfg.depth_distribution, cfg.mean_depth, cfg.depth_sigma, cfg.max_depth,
                           cfg.backprop_depth, cfg.depth_seed)


def layer_cost(cfg: DepthConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each entry of `layers` (the loop counted whole, at the expected depth)."""
    return _layer_cost_at(cfg, seq_len, *expected_steps(cfg))


def _layer_cost_at(cfg: DepthConfig, seq_len: int, no_grad: float, grad: float) -> list[float]:
    """`layer_cost` with the core run `no_grad` steps without and `grad` steps with gradients."""
    block = block_forward_flops(cfg, seq_len)
    if cfg.arch == "ut":
        return [3.0 * cfg.max_steps * (block + 2.0 * cfg.d_model)]
    core_step = cfg.n_core * block + 2.0 * 2 * cfg.d_model * cfg.d_model
    return [3.0 * block] * cfg.n_prelude + [(no_grad + 3.0 * grad) * core_step] + [3.0 * block] * cfg.n_coda


def flops_per_token(cfg: DepthConfig, seq_len: int) -> float:
    return sum(layer_cost(cfg, seq_len)) + 6.0 * cfg.d_model * cfg.vocab_size


def step_flops_per_token(cfg: DepthConfig, seq_len: int, step: int) -> float:
    """Training FLOPs per token of training step `step` at its own depth draw (the draw the model makes
    after the trainer's set_training_step(step)): what MFU counts. The UT's cost is the same every step."""
    draw = draw_depth(cfg, step) if cfg.arch == "huginn" else (0, 0)
    return sum(_layer_cost_at(cfg, seq_len, *draw)) + 6.0 * cfg.d_model * cfg.vocab_size


def shape_limits(cfg: DepthConfig) -> list[tuple[str, str, int]]:
    """Tensor parallelism splits every block's query and key/value heads and SwiGLU width (MoE: each
    expert's width, parallel/expert.py)."""
    return [("tp", "n_heads", cfg.n_heads), ("tp", "n_kv_heads", cfg.kv_heads), cfg.moe.mlp_tp_limit(cfg.hidden)]


def state_elements(cfg: DepthConfig) -> list[int]:
    """No recurrence over time: no state crosses a context-parallel split (attention all-gathers K/V)."""
    return [0] * cfg.n_layers


SPEC = ModelSpec(
    name="depth",
    config_cls=DepthConfig,
    model_cls=DepthLM,
    flops_per_token=flops_per_token,
    layer_cost=layer_cost,
    plan=plan,
    hf_adapter=hf,
    shape_limits=shape_limits,
    state_elements=state_elements,
    step_flops_per_token=step_flops_per_token,
)
