"""The shell every language model shares: embedding -> blocks -> final RMSNorm -> LM head."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from undertow.models.common.norms import RMSNorm


class CausalLMShell(nn.Module):
    """Owns `embed`, `layers`, `norm` and `lm_head` (tied to `embed` when cfg.tie_embeddings).

    cfg must have vocab_size, d_model, norm_eps, tie_embeddings, init_std and n_layers; every block
    must offer `init_weights(std, out_std)`. Subclasses write `forward`.
    """

    def __init__(self, cfg, blocks: Iterable[nn.Module]):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"{type(cfg).__name__}.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter (call after `to_empty` when built on the meta device)."""
        if self.cfg.tie_embeddings:
            # `to_empty` (meta -> real device) gives every parameter its own storage, untying them.
            self.lm_head.weight = self.embed.weight
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual branches scaled by depth (GPT-2)
        nn.init.normal_(self.embed.weight, std=std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.init_weights()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
