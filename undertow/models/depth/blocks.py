"""The blocks the recurrent-depth family loops: the transformer's pre-norm block (Universal
Transformer) and Huginn's sandwich block, both on the common attention, SwiGLU, RMSNorm and RoPE.

Sandwich block (Huginn-0125): every sub-layer's output is normalized again after the residual add,
    x = n2(x + attn(n1(x)));  x = n4(x + mlp(n3(x)))
which keeps the latent state's scale fixed however many times the core is applied.

With model.moe.n_experts > 0 the MLP is an MoE layer (linear router; config.py says why not rmoe).
A looped block's MoE layer adds its router losses at every application with gradients and records
its metrics at every application (averaged over the step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from undertow.models.common.decoding import KVCache, attention_with_cache
from undertow.models.common.mlp import SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.depth.config import DepthConfig
from undertow.models.moe.layer import MoELayer
from undertow.models.transformer.model import Attention


def build_attention(cfg: DepthConfig, qk_bias: bool) -> Attention:
    """The transformer's Attention; with `qk_bias`, query and key projections carry biases (Huginn's
    per-head q/k biases, added before RoPE, are exactly a Linear's bias)."""
    attn = Attention(cfg.attention_config())
    if qk_bias:
        attn.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=True)
        attn.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=True)
    return attn


def init_attention(attn: Attention, std: float, out_std: float) -> None:
    attn.init_weights(std, out_std)
    for proj in (attn.q_proj, attn.k_proj):
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)


def build_mlp(cfg: DepthConfig, index: int) -> nn.Module:
    """SwiGLU, or an MoE layer (named by `index` in its metrics: unique per block of the model)."""
    return MoELayer(cfg.d_model, cfg.hidden, cfg.moe, index) if cfg.moe.enabled else SwiGLU(cfg.d_model, cfg.hidden)


def mlp_out(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mlp(x), for a SwiGLU or an MoE layer (the linear router: no router state; called with all three
    arguments, as the tensor-parallel moe_styles expect)."""
    return mlp(x, None, None)[0] if isinstance(mlp, MoELayer) else mlp(x)


class SandwichBlock(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model); see the module docstring."""

    def __init__(self, cfg: DepthConfig, index: int = 0):
        super().__init__()
        self.norm_1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg, cfg.qk_bias)
        self.norm_2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.norm_3 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = build_mlp(cfg, index)
        self.norm_4 = RMSNorm(cfg.d_model, cfg.norm_eps)

    def init_weights(self, std: float, out_std: float) -> None:
        for norm in (self.norm_1, self.norm_2, self.norm_3, self.norm_4):
            norm.init_weights()
        init_attention(self.attn, std, out_std)
        self.mlp.init_weights(std, out_std)

    def forward(self, x, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None, position_ids=None):
        x = self.norm_2(x + self.attn(self.norm_1(x), cos, sin, doc_ids, cu_seqlens, max_seqlen))
        return self.norm_4(x + mlp_out(self.mlp, self.norm_3(x)))

    def step(self, x: torch.Tensor, cos, sin, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """Decoding: x (B, T, d_model) with the keys/values of earlier positions in `cache` (None:
        a prefill of the T positions) -> output, the cache including these positions."""
        out, cache = attention_with_cache(self.attn, self.norm_1(x), cos, sin, cache)
        x = self.norm_2(x + out)
        return self.norm_4(x + mlp_out(self.mlp, self.norm_3(x))), cache


def step_timing_signal(n_steps: int, d_model: int, device=None) -> torch.Tensor:
    """The Universal Transformer's depth timing signal: (n_steps, d_model), sin over the first half
    of the channels and cos over the second, at geometric frequencies 1 .. 1 / 10^4 (the
    transformer's sinusoid, indexed by step instead of position)."""
    half = d_model // 2
    steps = torch.arange(n_steps, device=device, dtype=torch.float32)[:, None]
    scales = torch.exp(-math.log(1e4) * torch.arange(half, device=device, dtype=torch.float32) / max(half - 1, 1))
    angles = steps * scales
    signal = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(signal, (0, d_model - 2 * half))
