"""The attention (`*`), MLP (`-`) and MoE (`E`) layers of xLSTM hybrids: x + mixer(RMSNorm(x)).

The attention is the transformer's (`Attention`: grouped-query, RoPE, document masks through
models/common's causal attention) built from the xLSTM config's attn_heads / attn_kv_heads; the MLP
is the common SwiGLU of the `m` blocks' FFN width. Decoding: attention keeps a key/value cache
(models/common/decoding.py's `attention_with_cache`, the Mamba hybrids' too); the MLP carries nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from undertow.models.common.decoding import KVCache, attention_with_cache
from undertow.models.common.mlp import SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.moe.layer import MoELayer
from undertow.models.transformer.config import TransformerConfig
from undertow.models.transformer.model import Attention
from undertow.models.xlstm.config import XLSTMConfig


def attention_config(cfg: XLSTMConfig) -> TransformerConfig:
    """The transformer config `*` layers are built from (head counts validated by XLSTMConfig)."""
    return TransformerConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                             n_heads=cfg.q_heads, n_kv_heads=cfg.kv_heads, rope_theta=cfg.rope_theta,
                             norm_eps=cfg.norm_eps)


class AttentionBlock(nn.Module):
    """x + attn(norm(x), cos, sin, documents). x: (B, T, d_model); cos/sin (B, T, head_dim)."""

    kind = "*"
    reads = ("cos", "sin", "doc_ids", "cu_seqlens", "max_seqlen")

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(attention_config(cfg))

    def init_weights(self, std: float, out_std: float, ffn_out_std: float) -> None:
        self.norm.init_weights()
        self.attn.init_weights(std, out_std)

    def forward(self, x, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None):
        return x + self.attn(self.norm(x), cos, sin, doc_ids, cu_seqlens, max_seqlen)

    def prefill(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, KVCache]:
        """A prompt (B, T, d_model) with its positions' cos/sin -> forward's output, its KV cache."""
        out, cache = attention_with_cache(self.attn, self.norm(x), cos, sin, None)
        return x + out, cache

    def step(self, x: torch.Tensor, cache: KVCache, cos, sin) -> tuple[torch.Tensor, KVCache]:
        """One token per row, x (B, d_model), cos/sin (B, 1, head_dim) of its position."""
        out, cache = attention_with_cache(self.attn, self.norm(x)[:, None], cos, sin, cache)
        return x + out[:, 0], cache


class MLPBlock(nn.Module):
    """x + mlp(norm(x)) (SwiGLU). x: (..., d_model)."""

    kind = "-"
    reads = ()

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden)

    def init_weights(self, std: float, out_std: float, ffn_out_std: float) -> None:
        self.norm.init_weights()
        self.mlp.init_weights(std, ffn_out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MoEBlock(nn.Module):
    """x + moe(norm(x)) -> (x, router state): SwiGLU experts of the SwiGLU width (model.moe), the
    router state in and out (models/moe/carry.py). x: (B, T, d_model)."""

    kind = "E"
    reads = ()
    is_moe = True

    def __init__(self, cfg: XLSTMConfig, index: int):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoELayer(cfg.d_model, cfg.hidden, cfg.moe, index)

    def init_weights(self, std: float, out_std: float, ffn_out_std: float) -> None:
        self.norm.init_weights()
        self.mlp.init_weights(std, ffn_out_std)

    def forward(self, x: torch.Tensor, router_state=None, router_gru=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, router_state = self.mlp(self.norm(x), router_state, router_gru)
        return x + out, router_state
