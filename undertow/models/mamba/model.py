"""Mamba / Mamba-2 / hybrid language model: a stack of pre-norm residual blocks, one mixer each.

A plain single-device module: parallelism is applied from outside (parallel/). Attention layers
reuse the transformer's `Attention` (with RoPE from position_ids, or no positional encoding under
position_embedding = "none") and MLP layers the common SwiGLU or GELU MLP (cfg.mlp).
"""

from __future__ import annotations

import torch
from torch import nn

from undertow.models.common.documents import recurrent_layer_context
from undertow.models.common.lm import CausalLMShell
from undertow.models.common.mlp import GeluMLP, SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.common.rope import rope_cos_sin
from undertow.models.mamba import generate as decoding
from undertow.models.mamba.config import MambaConfig
from undertow.models.mamba.mamba1 import Mamba1Mixer
from undertow.models.mamba.mamba2 import Mamba2Mixer
from undertow.models.transformer.model import Attention


def build_mixer(kind: str, cfg: MambaConfig) -> nn.Module:
    """The mixer of one `layer_pattern` letter."""
    if kind == "m":
        return Mamba1Mixer(cfg)
    if kind == "M":
        return Mamba2Mixer(cfg)
    if kind == "*":
        return Attention(cfg.attention_config(), rope=cfg.position_embedding == "rope")
    if kind == "-":
        return (GeluMLP if cfg.mlp == "gelu" else SwiGLU)(cfg.d_model, cfg.hidden)
    raise ValueError(f"layer kind {kind!r} is unknown; valid: m, M, *, -")


class Block(nn.Module):
    """x + mixer(norm(x)). x: (B, T, d_model) -> (B, T, d_model), in x's dtype (float32 residual
    when residual_in_fp32); the mixer runs in the weights' dtype (or autocast's)."""

    def __init__(self, kind: str, cfg: MambaConfig):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg)

    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.init_weights()
        self.mixer.init_weights(std, out_std)

    def mixer_input(self, x: torch.Tensor) -> torch.Tensor:
        """norm(x) in the dtype the mixer computes in: autocast's when it is on (every mixer starts
        with a projection that would round its input to it anyway), else the weights' (x may be the
        float32 residual of half-precision weights). The norm writes that dtype directly."""
        device = x.device.type
        on = torch.is_autocast_enabled(device)
        return self.norm(x, out_dtype=torch.get_autocast_dtype(device) if on else self.norm.weight.dtype)

    def forward(self, x, cos=None, sin=None, doc_ids=None, cu_seqlens=None, max_seqlen=None):
        h = self.mixer_input(x)
        if self.kind == "*":
            out = self.mixer(h, cos, sin, doc_ids, cu_seqlens, max_seqlen)
        elif self.kind == "-":
            out = self.mixer(h)
        else:
            out = self.mixer(h, doc_ids)
        return x + out.to(x.dtype)


class MambaLM(CausalLMShell):
    """forward(input_ids (B, T), ...) -> logits (B, T, vocab_size) (CausalLMShell.forward)."""

    def __init__(self, cfg: MambaConfig):
        cfg.validate()
        super().__init__(cfg, (Block(kind, cfg) for kind in cfg.layer_pattern))

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """cos, sin (B, T, head_dim) for the attention layers, or (None, None) when there are none or
        they use no positional encoding (position_embedding = "none"): no tables are computed."""
        if "*" not in self.cfg.layer_pattern or self.cfg.position_embedding == "none":
            return None, None
        return rope_cos_sin(position_ids, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        return x.float() if self.cfg.residual_in_fp32 else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x).to(self.lm_head.weight.dtype))

    def layer_context(self, input_shape, device, *, position_ids=None, doc_ids=None, cu_seqlens=None,
                      max_seqlen=None) -> dict:
        """The documents (doc_ids, and cu_seqlens for attention) and RoPE cos/sin for the attention
        layers: models/common/documents.py's recurrent_layer_context."""
        return recurrent_layer_context(self.rope, input_shape, device, position_ids, doc_ids, cu_seqlens, max_seqlen)

    def embed_stage(self, input_ids: torch.Tensor, ctx: dict) -> tuple[torch.Tensor]:
        return (self.embed_tokens(input_ids),)

    def head_stage(self, carried: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.logits(carried[0])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
        """Continue each row of `input_ids` (B, T) by `max_new_tokens` tokens -> (B, T + max_new_tokens).
        See generate.py: the prompt runs through the full forward once, then one token at a time."""
        return decoding.generate(self, input_ids, max_new_tokens, greedy=greedy)
