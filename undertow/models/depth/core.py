"""Huginn's recurrent core: the latent state s looped through adapter + core blocks r times.

    s_0 ~ TruncNormal(0, std^2, [-3 std, 3 std]) * embed_scale,  std = sqrt(2 / (5 d_model))
    s_i = core(adapter(concat(s_{i-1}, e)))   i = 1 .. r        e: the prelude's output
    out = norm(s_r)

Training: r drawn per training step (depth.py), the first r - k steps under no_grad and the last
k = min(backprop_depth, r) with gradients (truncated backpropagation through depth). Eval: r = the
test depth (any r >= 1, more than training is allowed).

s_0 is a hash of (seed, position, channel) pushed through the truncated normal's inverse CDF, the
seed drawn from depth_seed and the training step in training (fresh noise every step) and
depth_seed alone in eval. Unlike Huginn's torch.randn, it does not depend on which rank holds a row
or a slice of it, so every layout (data, context, pipeline parallel) computes the one-process
result, activation checkpointing recomputes the same s_0, evaluation is reproducible (a Huginn
users' complaint) and an exported model computes the same logits. The rows of one step share the
noise of a position (position ids restart with each document).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from undertow.models.common.aux import record_metric
from undertow.models.common.norms import RMSNorm
from undertow.models.depth.blocks import SandwichBlock
from undertow.models.depth.config import DepthConfig
from undertow.models.depth.depth import DepthDraw, draw_depth
from undertow.models.depth.replicated import replicated_as_local

_MASK31 = (1 << 31) - 1


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """An integer hash on int64 values in [0, 2^31) (products stay below 2^62: no overflow)."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK31
    return x ^ (x >> 15)


def hashed_truncated_normal(positions: torch.Tensor, d_model: int, seed: int, std: float) -> torch.Tensor:
    """positions (...) int -> (..., d_model) float32 samples of N(0, std^2) truncated to +-3 std, a
    pure function of (seed, position, channel): the same for a position in a full forward, in a
    context-parallel slice and in one-token decoding. Inverse-CDF of a hashed uniform."""
    channels = torch.arange(d_model, device=positions.device, dtype=torch.int64)
    key = (positions.to(torch.int64)[..., None] * 1_000_003 + channels * 7919 + seed * 104_729) & _MASK31
    u = (_mix31(_mix31(key) ^ (seed & _MASK31)).double() + 0.5) / float(1 << 31)
    lo, hi = (0.5 * (1 + math.erf(b / math.sqrt(2))) for b in (-3.0, 3.0))
    z = math.sqrt(2.0) * torch.erfinv(2 * (lo + u * (hi - lo)) - 1)
    return (z * std).float()


class RecurrentCore(nn.Module):
    """e (B, T, d_model) -> norm(s_r) (B, T, d_model); see the module docstring."""

    def __init__(self, cfg: DepthConfig, first_index: int = 0):
        """`first_index`: the model-wide index of the first core block (MoE metrics are named by it)."""
        super().__init__()
        self.cfg = cfg
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.blocks = nn.ModuleList(SandwichBlock(cfg, first_index + i) for i in range(cfg.n_core))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.training_step = 0
        self.depth: int | None = None  # a fixed depth for every forward (set_depth), else drawn/eval

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.adapter.weight, std=std)
        for block in self.blocks:
            block.init_weights(std, out_std)
        self.norm.init_weights()

    def plan(self) -> DepthDraw:
        """How many steps this forward runs without and with gradients."""
        if self.depth is not None:
            r = self.depth
        elif self.training:
            return draw_depth(self.cfg, self.training_step)
        else:
            r = self.cfg.test_depth
        k = min(self.cfg.backprop_depth, r) if self.training else r
        return DepthDraw(r - k, k)

    def state_seed(self) -> int:
        """The s_0 hash's seed: depth_seed in eval, a new one per training step in training."""
        if not self.training:
            return self.cfg.depth_seed
        return (self.cfg.depth_seed * 1_000_003 + (self.training_step + 1) * 7_919_317) & _MASK31

    def initial_state(self, e: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """s_0 like e (B, T, d_model); position_ids (B, T) or (T,) (default arange(T))."""
        std = math.sqrt(2.0 / (5.0 * self.cfg.d_model))
        if position_ids is None:
            position_ids = torch.arange(e.shape[1], device=e.device)
        s = hashed_truncated_normal(position_ids, e.shape[-1], self.state_seed(), std)
        return s.to(e.dtype).expand_as(e) * self.cfg.input_scale

    def step(self, s, e, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None, position_ids=None) -> torch.Tensor:
        """One core application: s, e (B, T, d_model) -> the next s (position_ids unused: the blocks'
        context is passed whole)."""
        s = self.adapter(torch.cat([s, e], dim=-1))
        for block in self.blocks:
            s = block(s, cos, sin, doc_ids, cu_seqlens, max_seqlen)
        return s

    def forward(self, e, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None, position_ids=None):
        with replicated_as_local(self):  # under TP: plain tensors throughout the loop (replicated.py)
            return self._loop(e, cos, sin, doc_ids, cu_seqlens, max_seqlen, position_ids)

    def _loop(self, e, cos, sin, doc_ids, cu_seqlens, max_seqlen, position_ids):
        draw = self.plan()
        record_metric("depth/r", draw.no_grad + draw.grad)
        record_metric("depth/backprop", draw.grad)
        s = self.initial_state(e, position_ids)
        with torch.no_grad():
            for _ in range(draw.no_grad):
                s = self.step(s, e, cos, sin, doc_ids, cu_seqlens, max_seqlen)
        for _ in range(draw.grad):
            s = self.step(s, e, cos, sin, doc_ids, cu_seqlens, max_seqlen)
        return self.norm(s)
