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
from undertow.models.common.mlp import GeluMLP, SwiGLU, swiglu_hidden
from undertow.models.common.norms import RMSNorm
from undertow.models.common.rope import rope_cos_sin
from undertow.models.mamba import generate as decoding
from undertow.models.mamba.config import MambaConfig
from undertow.models.mamba.mamba1 import Mamba1Mixer
from undertow.models.mamba.mamba2 import Mamba2Mixer
from undertow.models.moe.carry import RouterCarry
from undertow.models.moe.layer import MoELayer
from undertow.models.transformer.model import Attention


def build_mixer(kind: str, cfg: MambaConfig, index: int = 0) -> nn.Module:
    """The mixer of one `layer_pattern` letter at depth `index`."""
    if kind == "m":
        return Mamba1Mixer(cfg)
    if kind == "M":
        return Mamba2Mixer(cfg)
    if kind == "*":
        return Attention(cfg.attention_config(), rope=cfg.position_embedding == "rope")
    if kind == "-":
        return (GeluMLP if cfg.mlp == "gelu" else SwiGLU)(cfg.d_model, cfg.hidden)
    if kind == "E":  # SwiGLU experts of the `-` layers' SwiGLU width unless moe.expert_hidden
        return MoELayer(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.multiple_of), cfg.moe, index)
    raise ValueError(f"layer kind {kind!r} is unknown; valid: m, M, *, -, E")


class Block(nn.Module):
    """x + mixer(norm(x)). x: (B, T, d_model) -> (B, T, d_model), in x's dtype (float32 residual
    when residual_in_fp32); the mixer runs in the weights' dtype (or autocast's)."""

    def __init__(self, kind: str, cfg: MambaConfig, index: int = 0):
        super().__init__()
        self.kind = kind
        self.is_moe = kind == "E"  # takes and returns the router state (models/moe/carry.py)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, index)

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

    def forward(self, x, cos=None, sin=None, doc_ids=None, cu_seqlens=None, max_seqlen=None, router_state=None,
                router_gru=None):
        h = self.mixer_input(x)
        if self.is_moe:  # -> (x, the router state after this layer)
            out, router_state = self.mixer(h, router_state, router_gru)
            return x + out.to(x.dtype), router_state
        if self.kind == "*":
            out = self.mixer(h, cos, sin, doc_ids, cu_seqlens, max_seqlen)
        elif self.kind == "-":
            out = self.mixer(h)
        else:
            out = self.mixer(h, doc_ids)
        return x + out.to(x.dtype)


class MambaLM(RouterCarry, CausalLMShell):
    """forward(input_ids (B, T), ...) -> logits (B, T, vocab_size) (CausalLMShell.forward). `E` layers
    with the rmoe router carry its state from layer to layer (models/moe/carry.py)."""

    def __init__(self, cfg: MambaConfig):
        cfg.validate()
        super().__init__(cfg, (Block(kind, cfg, i) for i, kind in enumerate(cfg.layer_pattern)))
        self.setup_router(cfg.moe, "E" in cfg.layer_pattern)

    def init_weights(self) -> None:
        super().init_weights()
        self.init_router()

    def run_layer(self, layer: nn.Module, carried: tuple[torch.Tensor, ...], ctx: dict) -> tuple[torch.Tensor, ...]:
        return self.call_layer(layer, carried, **ctx)

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

    def embed_stage(self, input_ids: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, ...]:
        return self.add_router_state(self.embed_tokens(input_ids), input_ids)

    def head_stage(self, carried: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.logits(carried[0])

    def head_inputs(self, carried: tuple[torch.Tensor, ...]):
        return self.norm(carried[0]).to(self.lm_head.weight.dtype), None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
        """Continue each row of `input_ids` (B, T) by `max_new_tokens` tokens -> (B, T + max_new_tokens).
        See generate.py: the prompt runs through the full forward once, then one token at a time."""
        return decoding.generate(self, input_ids, max_new_tokens, greedy=greedy)
