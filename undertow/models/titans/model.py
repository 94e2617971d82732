"""Titans language model: embedding -> blocks (MAC, MAG or MAL, config.variant) -> RMSNorm -> head.

A plain single-device module: parallelism is applied from outside (parallel/, with plan.py).
Documents packed into a row never see each other: the memory restarts from its learned M_0 where
doc_ids changes (given directly or derived from cu_seqlens) and attention masks across documents.
With model.moe.n_experts > 0 every block's FFN is a mixture of experts; with the rmoe router its state
travels with the activations from block to block (models/moe/carry.py).
"""

from __future__ import annotations

import torch

from undertow.models.common.documents import recurrent_layer_context
from undertow.models.common.lm import CausalLMShell
from undertow.models.common.rope import rope_cos_sin
from undertow.models.moe.carry import RouterCarry
from undertow.models.titans import generate as decoding
from undertow.models.titans.blocks import build_block
from undertow.models.titans.config import TitansConfig


class TitansLM(RouterCarry, CausalLMShell):
    """forward(input_ids (B, T), *, position_ids=None, doc_ids=None, cu_seqlens=None, ...) -> logits
    (B, T, vocab_size)."""

    def __init__(self, cfg: TitansConfig):
        cfg.validate()
        super().__init__(cfg, (build_block(cfg, i) for i in range(cfg.n_layers)))
        self.setup_router(cfg.moe, cfg.moe.enabled)

    def init_weights(self) -> None:
        super().init_weights()
        self.init_router()

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, head_dim) of the attention."""
        return rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)

    def layer_context(self, input_shape, device, *, position_ids=None, doc_ids=None, cu_seqlens=None,
                      max_seqlen=None) -> dict:
        """The documents (doc_ids for the memory and the masks, cu_seqlens for flash-attn) and RoPE's cos/sin."""
        return recurrent_layer_context(self.rope, input_shape, device, position_ids, doc_ids, cu_seqlens, max_seqlen)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
        """Continue each row of `input_ids` (B, T) by `max_new_tokens` tokens -> (B, T + max_new_tokens),
        carrying each block's memory state and attention cache from token to token."""
        return decoding.generate(self, input_ids, max_new_tokens, greedy=greedy)
