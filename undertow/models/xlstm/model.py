"""xLSTM language model (xLSTM-7B's architecture): embedding -> mLSTM blocks -> RMSNorm -> head -> soft-cap.

A plain single-device module: parallelism is applied from outside (parallel/, with plan.py).
Documents packed into a row never see each other: the mLSTM resets its state (C, n, m) where
doc_ids changes (given directly, or derived from cu_seqlens); the model has no positions to reset.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from undertow.models.common.documents import doc_ids_from_cu_seqlens
from undertow.models.common.lm import CausalLMShell
from undertow.models.common.mlp import SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.xlstm import generate as decoding
from undertow.models.xlstm.config import XLSTMConfig
from undertow.models.xlstm.mlstm_layer import MLSTMLayer, MLSTMState, soft_cap


class MLSTMBlock(nn.Module):
    """x + mlstm(norm_mlstm(x)), then + ffn(norm_ffn(x)). x: (B, T, d_model) -> (B, T, d_model)."""

    kind = "m"

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.norm_mlstm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlstm = MLSTMLayer(cfg)
        self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.hidden)

    def init_weights(self, std: float, out_std: float, ffn_out_std: float) -> None:
        self.norm_mlstm.init_weights()
        self.norm_ffn.init_weights()
        self.mlstm.init_weights(std, out_std)
        self.ffn.init_weights(std, ffn_out_std)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.add_ffn(x + self.mlstm(self.norm_mlstm(x), doc_ids))

    def add_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm_ffn(x))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, MLSTMState]:
        """forward(x) of a prompt (B, T, d_model), and the mLSTM state after its last token."""
        out, state = self.mlstm(self.norm_mlstm(x), return_state=True)
        return self.add_ffn(x + out), state

    def step(self, x: torch.Tensor, state: MLSTMState) -> tuple[torch.Tensor, MLSTMState]:
        """One token per row, x (B, d_model), after the tokens `state` holds -> (B, d_model), next state."""
        out, state = self.mlstm.step(self.norm_mlstm(x), state)
        return self.add_ffn(x + out), state


class XLSTMLM(CausalLMShell):
    """forward(input_ids (B, T), *, doc_ids=None, cu_seqlens=None, ...) -> logits (B, T, vocab_size),
    float32 and soft-capped to (-logit_soft_cap, logit_soft_cap)."""

    def __init__(self, cfg: XLSTMConfig):
        cfg.validate()
        super().__init__(cfg, (MLSTMBlock(cfg) for _ in cfg.pattern))

    @torch.no_grad()
    def init_weights(self) -> None:
        """xLSTM-7B's initialization (transformers' xLSTMPreTrainedModel._init_weights): embedding, head
        and input projections normal(sqrt(2 / (5 d))) ("small init"); out_proj and the FFN's down
        projection normal(2 / (n_layers sqrt(fan_in))) ("Wang init", so deep stacks start near the
        identity); gates as in MLSTMLayer.init_weights. transformers also zeroes the FFN's gate
        projection, but only because its name `proj_up_gate` contains "gate" (its rule is written for
        the mLSTM gates), which would start every FFN at exactly zero output; here it gets the small init."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # `to_empty` gave them separate storage
        std = cfg.small_init_std
        out_std = 2.0 / cfg.n_layers / math.sqrt(cfg.d_model)
        ffn_out_std = 2.0 / cfg.n_layers / math.sqrt(cfg.hidden)
        nn.init.normal_(self.embed.weight, std=std)
        for layer in self.layers:
            layer.init_weights(std, out_std, ffn_out_std)
        self.norm.init_weights()
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def layer_context(self, input_shape, device, *, position_ids=None, doc_ids=None, cu_seqlens=None,
                      max_seqlen=None) -> dict:
        """The documents, as doc_ids (B, T) (from cu_seqlens when only those are given) or None."""
        B, T = input_shape
        if doc_ids is None and cu_seqlens is not None:
            doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, B, T)
        return {"doc_ids": doc_ids}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) after the last block -> soft-capped float32 logits (..., vocab_size)."""
        return soft_cap(self.lm_head(self.norm(x)).float(), self.cfg.logit_soft_cap)

    def head_stage(self, carried: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.logits(carried[0])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
        """Continue each row of `input_ids` (B, T) by `max_new_tokens` tokens -> (B, T + max_new_tokens):
        the prompt runs through the blocks once, then one token at a time on the carried states."""
        return decoding.generate(self, input_ids, max_new_tokens, greedy=greedy)
