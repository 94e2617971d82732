"""ParaRNN language model: embedding -> pre-norm residual blocks (one per layer_pattern letter) ->
RMSNorm -> LM head.

A plain single-device module: parallelism is applied from outside (parallel/, with plan.py).
Documents packed into a row never see each other: the conv windows and the ParaGRU/ParaLSTM states
reset where doc_ids changes (given directly, or derived from cu_seqlens), and attention masks
across documents. `E` blocks are mixture-of-experts MLPs (models/moe); with the rmoe router its state
travels with the activations from E block to E block (models/moe/carry.py).
"""

from __future__ import annotations

import torch
from torch import nn

from undertow.models.common.documents import recurrent_layer_context
from undertow.models.common.lm import CausalLMShell
from undertow.models.common.mlp import SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.common.rope import rope_cos_sin
from undertow.models.moe.carry import RouterCarry
from undertow.models.moe.layer import MoELayer
from undertow.models.pararnn import generate as decoding
from undertow.models.pararnn.cell_layer import ParaRNNMixer
from undertow.models.pararnn.config import CELLS, ParaRNNConfig
from undertow.models.transformer.config import TransformerConfig
from undertow.models.transformer.model import Attention


def attention_config(cfg: ParaRNNConfig) -> TransformerConfig:
    """The transformer config `*` layers are built from (head counts validated by ParaRNNConfig)."""
    return TransformerConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                             n_heads=cfg.attn_heads, n_kv_heads=cfg.kv_heads, rope_theta=cfg.rope_theta,
                             norm_eps=cfg.norm_eps)


def build_mixer(kind: str, cfg: ParaRNNConfig, index: int = 0) -> nn.Module:
    """The mixer of one layer_pattern letter at depth `index`."""
    if kind in CELLS:
        return ParaRNNMixer(cfg, CELLS[kind])
    if kind == "*":
        return Attention(attention_config(cfg))
    if kind == "-":
        return SwiGLU(cfg.d_model, cfg.hidden)
    if kind == "E":  # SwiGLU experts of the `-` layers' width unless moe.expert_hidden
        return MoELayer(cfg.d_model, cfg.hidden, cfg.moe, index)
    raise ValueError(f"layer kind {kind!r} is unknown; valid: g, l, *, -, E")


class Block(nn.Module):
    """x + mixer(norm(x)). x: (B, T, d_model) -> (B, T, d_model); an `E` block -> (x, router state)."""

    def __init__(self, kind: str, cfg: ParaRNNConfig, index: int = 0):
        super().__init__()
        self.kind = kind
        self.is_moe = kind == "E"  # takes and returns the router state (models/moe/carry.py)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, index)

    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.init_weights()
        self.mixer.init_weights(std, out_std)

    def forward(self, x, cos=None, sin=None, doc_ids=None, cu_seqlens=None, max_seqlen=None, router_state=None,
                router_gru=None):
        h = self.norm(x)
        if self.is_moe:  # -> (x, the router state after this block)
            out, router_state = self.mixer(h, router_state, router_gru)
            return x + out, router_state
        if self.kind == "*":
            return x + self.mixer(h, cos, sin, doc_ids, cu_seqlens, max_seqlen)
        if self.kind == "-":
            return x + self.mixer(h)
        return x + self.mixer(h, doc_ids)


class ParaRNNLM(RouterCarry, CausalLMShell):
    """forward(input_ids (B, T), *, doc_ids=None, cu_seqlens=None, ...) -> logits (B, T, vocab_size).
    `E` blocks with the rmoe router carry its state from block to block (models/moe/carry.py)."""

    def __init__(self, cfg: ParaRNNConfig):
        cfg.validate()
        super().__init__(cfg, (Block(kind, cfg, i) for i, kind in enumerate(cfg.layer_pattern)))
        self.setup_router(cfg.moe, "E" in cfg.layer_pattern)

    def init_weights(self) -> None:
        super().init_weights()
        self.init_router()

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """cos, sin (B, T, head_dim) for the attention layers, or (None, None) without any."""
        if "*" not in self.cfg.layer_pattern:
            return None, None
        return rope_cos_sin(position_ids, self.cfg.d_model // self.cfg.attn_heads, self.cfg.rope_theta)

    def layer_context(self, input_shape, device, *, position_ids=None, doc_ids=None, cu_seqlens=None,
                      max_seqlen=None) -> dict:
        """The documents (doc_ids, and cu_seqlens for attention) and RoPE cos/sin for the attention
        layers: models/common/documents.py's recurrent_layer_context."""
        return recurrent_layer_context(self.rope, input_shape, device, position_ids, doc_ids, cu_seqlens, max_seqlen)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
        """Continue each row of `input_ids` (B, T) by `max_new_tokens` tokens -> (B, T + max_new_tokens):
        the prompt runs through the full forward once, then one token at a time through the cell step
        and the conv step (generate.py)."""
        return decoding.generate(self, input_ids, max_new_tokens, greedy=greedy)
