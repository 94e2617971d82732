"""xLSTM language model: embedding -> blocks (one per layer_pattern letter) -> RMSNorm -> head -> soft-cap.

A plain single-device module: parallelism is applied from outside (parallel/, with plan.py).
Documents packed into a row never see each other: every recurrence (mLSTM (C, n, m), sLSTM
(y, c, n, m), the conv windows) resets where doc_ids changes (given directly, or derived from
cu_seqlens), and attention masks across documents.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from undertow.models.common.documents import recurrent_layer_context
from undertow.models.common.lm import CausalLMShell
from undertow.models.common.mlp import SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.common.rope import rope_cos_sin
from undertow.models.xlstm import generate as decoding
from undertow.models.xlstm.config import XLSTMConfig
from undertow.models.moe.carry import RouterCarry
from undertow.models.xlstm.hybrid_blocks import AttentionBlock, MLPBlock, MoEBlock
from undertow.models.xlstm.mlstm_layer import MLSTMLayer, soft_cap
from undertow.models.xlstm.paper_parts import GatedGeluFFN, pre_norm
from undertow.models.xlstm.slstm_layer import SLSTMLayer
from undertow.models.xlstm.up_mlstm_layer import UpMLSTMLayer


class RecurrentBlock(nn.Module):
    """x + mixer(norm(x)), then + ffn(norm_ffn(x)) where the block has an FFN. x: (B, T, d_model).

    Subclasses build `norm_ffn` and `ffn` (or set ffn = None) and name their pre-norm and mixer in
    `branch()` (the names are the checkpoint's and the TP plan's). The mixer takes (x, doc_ids,
    state, return_state) and offers `step(x, state)`, so prefill and decoding are written once here.
    """

    kind: str
    reads = ("doc_ids",)  # what the block takes of the model's layer context

    def branch(self) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        norm, mixer = self.branch()
        return self.add_ffn(x + mixer(norm(x), doc_ids))

    def add_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.ffn is None else x + self.ffn(self.norm_ffn(x))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """forward(x) of a prompt (B, T, d_model), and the mixer's state after its last token."""
        norm, mixer = self.branch()
        out, state = mixer(norm(x), return_state=True)
        return self.add_ffn(x + out), state

    def step(self, x: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """One token per row, x (B, d_model), after the tokens `state` holds -> (B, d_model), next state."""
        norm, mixer = self.branch()
        out, state = mixer.step(norm(x), state)
        return self.add_ffn(x + out), state


class MLSTMBlock(RecurrentBlock):
    """`m`, xLSTM-7B's block: x + mlstm(norm_mlstm(x)), then + ffn(norm_ffn(x)) (SwiGLU)."""

    kind = "m"

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.norm_mlstm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlstm = MLSTMLayer(cfg)
        self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.hidden)

    def branch(self):
        return self.norm_mlstm, self.mlstm

    def init_weights(self, std: float, out_std: float, ffn_out_std: float) -> None:
        self.norm_mlstm.init_weights()
        self.norm_ffn.init_weights()
        self.mlstm.init_weights(std, out_std)
        self.ffn.init_weights(std, ffn_out_std)


class SLSTMBlock(RecurrentBlock):
    """`s`, the paper's sLSTM block: x + slstm(norm_slstm(x)), then + ffn(norm_ffn(x)) (gated GeLU,
    slstm_ffn_factor * d_model). `index`: the block's depth (its forget-gate bias init depends on it)."""

    kind = "s"

    def __init__(self, cfg: XLSTMConfig, index: int):
        super().__init__()
        self.norm_slstm = pre_norm(cfg)
        self.slstm = SLSTMLayer(cfg, index)
        self.norm_ffn = pre_norm(cfg)
        self.ffn = GatedGeluFFN(cfg.d_model, cfg.slstm_ffn_hidden)

    def branch(self):
        return self.norm_slstm, self.slstm

    def init_weights(self, std: float, out_std: float, ffn_out_std: float) -> None:
        """The xLSTM code's FFN init: up projections small, down Wang-scaled by d_model (out_std)."""
        self.norm_slstm.init_weights()
        self.norm_ffn.init_weights()
        self.slstm.init_weights(std)
        self.ffn.init_weights(std, out_std)


class UpMLSTMBlock(RecurrentBlock):
    """`M`, the paper's mLSTM block: x + mlstm(norm_mlstm(x)) with the up-projection inside; no FFN."""

    kind = "M"

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.norm_mlstm = pre_norm(cfg)
        self.mlstm = UpMLSTMLayer(cfg)
        self.ffn = None

    def branch(self):
        return self.norm_mlstm, self.mlstm

    def init_weights(self, std: float, out_std: float, ffn_out_std: float) -> None:
        self.norm_mlstm.init_weights()
        self.mlstm.init_weights(std, out_std)


def build_block(kind: str, cfg: XLSTMConfig, index: int) -> nn.Module:
    """The block of one layer_pattern letter at depth `index`."""
    if kind == "m":
        return MLSTMBlock(cfg)
    if kind == "s":
        return SLSTMBlock(cfg, index)
    if kind == "M":
        return UpMLSTMBlock(cfg)
    if kind == "*":
        return AttentionBlock(cfg)
    if kind == "-":
        return MLPBlock(cfg)
    if kind == "E":
        return MoEBlock(cfg, index)
    raise ValueError(f"layer kind {kind!r} is unknown; valid: m, s, M, *, -, E")


class XLSTMLM(RouterCarry, CausalLMShell):
    """forward(input_ids (B, T), *, doc_ids=None, cu_seqlens=None, ...) -> logits (B, T, vocab_size),
    float32 and soft-capped to (-logit_soft_cap, logit_soft_cap)."""

    def __init__(self, cfg: XLSTMConfig):
        cfg.validate()
        super().__init__(cfg, (build_block(kind, cfg, i) for i, kind in enumerate(cfg.pattern)))
        self.setup_router(cfg.moe, "E" in cfg.pattern)  # `E` layers with the rmoe router: models/moe/carry.py

    @torch.no_grad()
    def init_weights(self) -> None:
        """xLSTM-7B's initialization (transformers' xLSTMPreTrainedModel._init_weights): embedding, head
        and input projections normal(sqrt(2 / (5 d))) ("small init"); out_proj and the FFN's down
        projection normal(2 / (n_layers sqrt(fan_in))) ("Wang init", so deep stacks start near the
        identity); gates as in MLSTMLayer.init_weights. transformers also zeroes the FFN's gate
        projection, but only because its name `proj_up_gate` contains "gate" (its rule is written for
        the mLSTM gates), which would start every FFN at exactly zero output; here it gets the small
        init. The paper's blocks follow the xLSTM code (their init_weights); attention and MLP layers
        take the same small and Wang inits."""
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
        self.init_router()

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """cos, sin (B, T, head_dim) for the attention layers, or (None, None) without any."""
        if "*" not in self.cfg.pattern:
            return None, None
        return rope_cos_sin(position_ids, self.cfg.d_model // self.cfg.q_heads, self.cfg.rope_theta)

    def layer_context(self, input_shape, device, *, position_ids=None, doc_ids=None, cu_seqlens=None,
                      max_seqlen=None) -> dict:
        """The documents (doc_ids, and cu_seqlens for attention) and RoPE cos/sin for the attention
        layers: models/common/documents.py's recurrent_layer_context."""
        return recurrent_layer_context(self.rope, input_shape, device, position_ids, doc_ids, cu_seqlens, max_seqlen)

    def run_layer(self, layer: nn.Module, carried: tuple[torch.Tensor, ...], ctx: dict) -> tuple[torch.Tensor, ...]:
        """Each block takes the part of the context it reads (`reads`: recurrences the documents,
        attention also RoPE and cu_seqlens, MLPs nothing)."""
        return self.call_layer(layer, carried, **{name: ctx[name] for name in layer.reads})

    def embed_stage(self, input_ids: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, ...]:
        return self.add_router_state(self.embed(input_ids), input_ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) after the last block -> soft-capped float32 logits (..., vocab_size)."""
        return soft_cap(self.lm_head(self.norm(x)).float(), self.cfg.logit_soft_cap)

    def head_stage(self, carried: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.logits(carried[0])

    def head_inputs(self, carried: tuple[torch.Tensor, ...]):
        return self.norm(carried[0]), self.cfg.logit_soft_cap or None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
        """Continue each row of `input_ids` (B, T) by `max_new_tokens` tokens -> (B, T + max_new_tokens):
        the prompt runs through the blocks once, then one token at a time on the carried states."""
        return decoding.generate(self, input_ids, max_new_tokens, greedy=greedy)
