"""The shell every language model shares: embedding -> blocks -> final RMSNorm -> LM head.

The forward pass is written once, here, as four steps a family can override:

    ctx     = self.layer_context(input_shape, position_ids=..., doc_ids=..., cu_seqlens=..., max_seqlen=...)
    carried = self.embed_stage(input_ids, ctx)          # tuple of activation tensors
    carried = self.run_layer(layer, carried, ctx)       # for each block of `layers`
    logits  = self.head_stage(carried)

`ctx` holds what every block reads besides the activations (RoPE cos/sin, document ids, ...),
computed from the batch's side inputs; `carried` is what flows from block to block (the residual
stream, and for families that need it more tensors, e.g. router or recurrent-depth state).
Pipeline parallelism (parallel/pipeline.py) runs the same four steps split over stages: each stage
computes `ctx` from the side inputs itself and sends `carried` to the next stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from undertow.models.common.norms import RMSNorm


class CausalLMShell(nn.Module):
    """Owns `embed`, `layers`, `norm` and `lm_head` (tied to `embed` when cfg.tie_embeddings).

    cfg must have vocab_size, d_model, norm_eps, tie_embeddings, init_std and n_layers; every block
    must offer `init_weights(std, out_std)` and take `block(x, **ctx)`. Subclasses provide
    `layer_context` and override the other steps where they differ.
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

    # ---- the forward pass in steps (see the module docstring); pipeline stages run slices of it
    def layer_context(self, input_shape: torch.Size, device: torch.device, *, position_ids=None, doc_ids=None,
                      cu_seqlens=None, max_seqlen=None) -> dict:
        """Keyword arguments of every block for a batch of `input_shape` (B, T)."""
        raise NotImplementedError

    def embed_stage(self, input_ids: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, ...]:
        """input_ids (B, T) -> the carried activations, (hidden (B, T, d_model),)."""
        return (self.embed(input_ids),)

    def run_layer(self, layer: nn.Module, carried: tuple[torch.Tensor, ...], ctx: dict) -> tuple[torch.Tensor, ...]:
        return (layer(carried[0], **ctx),)

    def head_stage(self, carried: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The carried activations after the last block -> logits (B, T, vocab_size)."""
        return self.lm_head(self.norm(carried[0]))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab_size)."""
        ctx = self.layer_context(input_ids.shape, input_ids.device, position_ids=position_ids, doc_ids=doc_ids,
                                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        carried = self.embed_stage(input_ids, ctx)
        for layer in self.layers:
            carried = self.run_layer(layer, carried, ctx)
        return self.head_stage(carried)
