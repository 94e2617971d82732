"""The shell every language model shares: embedding -> blocks -> final RMSNorm -> LM head.

The forward pass is written once, here, as four steps a family can override:

    ctx     = self.layer_context(input_shape, position_ids=..., doc_ids=..., cu_seqlens=..., max_seqlen=...)
    carried = self.embed_stage(input_ids, ctx)          # tuple of activation tensors
    carried = self.run_layer(layer, carried, ctx)       # for each block of `layers`
    logits  = self.head_stage(carried)

With `labels` the forward returns the summed cross-entropy instead of the logits: through
`head_inputs` (the final norm's output, the head's weight and the logit soft-cap) and
models/common/fused_loss.py, which never builds the (tokens, vocab) logits tensor; a family whose
head is not a plain linear head returns None there and gets lm_loss_sum of head_stage's logits.

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
from torch.distributed.tensor import DTensor

from undertow.models.common.fused_loss import LMHead
from undertow.models.common.loss import lm_loss_sum
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
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
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

    def head_inputs(self, carried: tuple[torch.Tensor, ...]):
        """(hidden (B, T, d), logit soft-cap or None) such that head_stage's logits are
        soft_cap(lm_head(hidden)), for the fused loss; None where head_stage is something else (a
        family that overrides head_stage overrides this too, or gets the unfused loss)."""
        if type(self).head_stage is not CausalLMShell.head_stage:
            return None
        return self.norm(carried[0]), None

    def head_loss_sum(self, carried: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of head_stage's logits against labels (B, T) (-100: not counted)."""
        inputs = self.head_inputs(carried)
        if inputs is None or not isinstance(self.lm_head, LMHead) or isinstance(self.lm_head.weight, DTensor):
            return lm_loss_sum(self.head_stage(carried), labels)  # e.g. a tensor-parallel head: vocab-parallel loss
        hidden, soft_cap = inputs
        return self.lm_head(hidden, labels=labels, soft_cap=soft_cap)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab_size); with labels (B, T), the summed cross-entropy
        (float32, 0-d; labels -100 not counted) without the logits tensor (`head_loss_sum`)."""
        ctx = self.layer_context(input_ids.shape, input_ids.device, position_ids=position_ids, doc_ids=doc_ids,
                                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        carried = self.embed_stage(input_ids, ctx)
        for layer in self.layers:
            carried = self.run_layer(layer, carried, ctx)
        return self.head_stage(carried) if labels is None else self.head_loss_sum(carried, labels)
