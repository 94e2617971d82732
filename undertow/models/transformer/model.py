"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query causal attention.

Also the attention block of hybrid stacks. A plain single-device module: parallelism is
applied from outside (parallel/). Projections are separate (q/k/v/o, gate/up/down) so a
tensor-parallel plan can shard them by head / column.
"""

from __future__ import annotations

import torch
from torch import nn

from undertow.models.common.attention import causal_attention
from undertow.models.common.lm import CausalLMShell
from undertow.models.common.mlp import SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.common.rope import apply_rope, rope_cos_sin
from undertow.models.moe.carry import RouterCarry
from undertow.models.moe.layer import MoELayer
from undertow.models.transformer.config import TransformerConfig


class Attention(nn.Module):
    """Grouped-query self-attention. x: (B, T, d_model) -> (B, T, d_model).

    rope=False: queries and keys are not rotated (no positional encoding, Megatron-LM's
    `--position-embedding-type none`, for hybrids whose recurrent layers carry the order); the
    layer is then called with cos = sin = None.
    """

    def __init__(self, cfg: TransformerConfig, rope: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.rope = rope
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)

    def project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d_model), cos/sin (B, T, head_dim) or None (rope=False) -> q (B, T, H, head_dim),
        k, v (B, T, Hkv, head_dim); q and k rotated when the layer uses RoPE."""
        B, T, _ = x.shape
        # Shapes come from the weights so a tensor-parallel shard sees its local head count.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        out = causal_attention(q, k, v, doc_ids=doc_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.o_proj(out.reshape(B, T, -1))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)).

    With cfg.moe.n_experts > 0 the MLP is an MoELayer and the block returns (x, router state): the
    RMoE router's state h (B, T, router_dim) comes in as `router_state` with the model's shared
    `router_gru` and leaves updated (None for the linear router)."""

    def __init__(self, cfg: TransformerConfig, index: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.moe.enabled
        self.mlp = MoELayer(cfg.d_model, cfg.hidden, cfg.moe, index) if self.is_moe else SwiGLU(cfg.d_model, cfg.hidden)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn_norm.init_weights()
        self.mlp_norm.init_weights()
        self.attn.init_weights(std, out_std)
        self.mlp.init_weights(std, out_std)

    def forward(self, x, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None, router_state=None,
                router_gru=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, cu_seqlens, max_seqlen)
        if not self.is_moe:
            return x + self.mlp(self.mlp_norm(x))
        out, router_state = self.mlp(self.mlp_norm(x), router_state, router_gru)
        return x + out, router_state


class TransformerLM(RouterCarry, CausalLMShell):
    """Decoder-only LM. forward(input_ids (B, T), ...) -> logits (B, T, vocab_size). With MoE and the
    rmoe router, the router state travels with the activations (models/moe/carry.py)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg, (TransformerBlock(cfg, i) for i in range(cfg.n_layers)))
        self.setup_router(cfg.moe, cfg.moe.enabled)

    def init_weights(self) -> None:
        super().init_weights()
        self.init_router()

    def embed_stage(self, input_ids: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, ...]:
        return self.add_router_state(self.embed(input_ids), input_ids)

    def run_layer(self, layer: nn.Module, carried: tuple[torch.Tensor, ...], ctx: dict) -> tuple[torch.Tensor, ...]:
        return self.call_layer(layer, carried, **ctx)

    def layer_context(self, input_shape, device, *, position_ids=None, doc_ids=None, cu_seqlens=None,
                      max_seqlen=None) -> dict:
        """RoPE cos/sin (B, T, head_dim) from position_ids (arange(T) when absent), and the documents."""
        B, T = input_shape
        if position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        return {"cos": cos, "sin": sin, "doc_ids": doc_ids, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
