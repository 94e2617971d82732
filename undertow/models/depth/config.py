"""Hyper-parameters of the recurrent-depth family: one config, two architectures (`arch`).

  ut      Universal Transformer (Dehghani et al. 2018): one shared pre-norm attention + SwiGLU
          block looped up to `max_steps` times with a step timing signal, adaptive computation
          time (ACT) per position, ponder loss `ponder_tau * mean(N + R)`.
  huginn  recurrent depth (Geiping et al. 2025, Huginn-0125): `n_prelude` sandwich blocks ->
          `n_core` sandwich blocks looped r times on s = adapter(concat(s, e)) -> `n_coda` blocks.
          Training depth r ~ Poisson(LogNormal(log(mean_depth) - sigma^2 / 2, sigma)) + 1, drawn per
          training step (the same on every rank), backprop through the last `backprop_depth` steps.

With model.moe.n_experts > 0 every block's MLP (the UT's shared block, Huginn's prelude, core and
coda blocks) is a mixture of experts with the linear router. The rmoe router is refused: its GRU state
runs from layer to layer, and here the looped blocks are applied a number of times that is drawn per
training step, chosen at test time, differs per position (ACT halting, Huginn's early exit) and runs
partly without gradients, with one W1_l/W2_l per block reused at every application; a router state
"from the previous layer" has no fixed meaning across that loop (RMOE_REFUSAL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from undertow.configtools import check, opt
from undertow.models.common.mlp import swiglu_hidden
from undertow.models.moe.config import MoEConfig
from undertow.models.transformer.config import TransformerConfig

RMOE_REFUSAL = ("the depth family loops its blocks a number of times drawn per training step, set at test time and "
                "different per position (ACT halting, early exit), so RMoE's layer-to-layer router state has no "
                "fixed sequence of layers to run over; use 'linear'")

# a truncated depth distribution keeping less than this share of its draws below max_depth "has no mass"
MIN_DEPTH_MASS = 1e-3


@dataclass
class DepthConfig:
    arch: Literal["ut", "huginn"] = opt(
        "huginn", help="ut: Universal Transformer with ACT; huginn: prelude -> looped core -> coda.")
    vocab_size: int = opt(0, help="0: take the vocabulary size of the data's tokenizer.")
    d_model: int = opt(256, help="Width of the residual stream and of the latent state.")
    n_heads: int = opt(4, help="Query heads (head dim = d_model / n_heads, even for RoPE).")
    n_kv_heads: int = opt(0, help="Key/value heads (0: n_heads).")
    ffn_hidden: int = opt(0, help="SwiGLU width (0: 8/3 d_model rounded up to multiple_of).")
    multiple_of: int = opt(64, help="Rounding of the automatic SwiGLU width.")
    rope_theta: float = opt(10000.0, help="RoPE base (Huginn-0125: 50000).")
    norm_eps: float = opt(1e-5, help="RMSNorm epsilon.")
    tie_embeddings: bool = opt(True, help="Share the input embedding and the LM head.")
    init_std: float = opt(0.02, help="Std of the normal initialization (0: Huginn's sqrt(2 / (5 d_model))).")
    # ---- Universal Transformer
    max_steps: int = opt(6, help="ut: most applications of the shared block per position.")
    act: bool = opt(True, help="ut: adaptive computation time (false: always max_steps steps).")
    act_eps: float = opt(0.01, help="ut: positions halt once their halting sum exceeds 1 - act_eps; in (0, 1).")
    ponder_tau: float = opt(0.01, help="ut: weight of the ponder loss tau * mean(N + R).")
    # ---- Huginn
    n_prelude: int = opt(2, help="huginn: blocks before the loop.")
    n_core: int = opt(2, help="huginn: blocks of the looped core.")
    n_coda: int = opt(2, help="huginn: blocks after the loop.")
    qk_bias: bool = opt(True, help="huginn: biases on the query and key projections.")
    embed_scale: float = opt(0.0, help="Embedding scale, and Huginn's initial state's (0: sqrt(d_model), Huginn's "
                                       "and tensor2tensor's, whose unit timing signal needs embeddings of order one).")
    depth_distribution: Literal["poisson-lognormal", "fixed"] = opt(
        "poisson-lognormal", help="huginn: training depth r per step: Poisson(LogNormal) + 1, or round(mean_depth).")
    mean_depth: float = opt(8.0, help="huginn: mean training depth (Huginn-0125: 32); >= 1.")
    depth_sigma: float = opt(0.5, help="huginn: sigma of the log-normal rate.")
    max_depth: int = opt(64, help="huginn: training draws are clamped to this depth (r_max).")
    backprop_depth: int = opt(4, help="huginn: k, the last steps run with gradients (Huginn-0125: 8); <= max_depth.")
    eval_depth: int = opt(0, help="huginn: depth in eval mode and generation (0: round(mean_depth)); any r >= 1.")
    depth_seed: int = opt(0, help="huginn: seed of the depth draws and of s_0's hash (with the training step).")
    moe: MoEConfig = opt(factory=MoEConfig, help="Mixture of experts in place of every block's MLP "
                                                   "(moe.n_experts > 0; linear router only).")

    # ---- derived
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or swiglu_hidden(self.d_model, self.multiple_of)

    @property
    def n_layers(self) -> int:
        """Entries of the model's `layers`: ut one (the ACT loop), huginn prelude + core + coda."""
        return 1 if self.arch == "ut" else self.n_prelude + 1 + self.n_coda

    @property
    def weight_std(self) -> float:
        return self.init_std or math.sqrt(2.0 / (5.0 * self.d_model))

    @property
    def input_scale(self) -> float:
        """Embeddings times sqrt(d_model) have entries of order one (Huginn's init: ~0.63): Huginn scales
        them (and s_0) so; the Universal Transformer (tensor2tensor) too, before adding its timing
        signal of unit amplitude, which would otherwise drown the tokens."""
        return self.embed_scale or math.sqrt(self.d_model)

    @property
    def test_depth(self) -> int:
        return self.eval_depth or max(1, round(self.mean_depth))

    def attention_config(self) -> TransformerConfig:
        """The shared attention/MLP shapes as a TransformerConfig (to build common blocks)."""
        return TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=1, n_heads=self.n_heads,
                                 n_kv_heads=self.n_kv_heads, ffn_hidden=self.hidden, rope_theta=self.rope_theta,
                                 norm_eps=self.norm_eps, init_std=self.weight_std, moe=self.moe)

    def depth_mass(self, draws: int = 4096) -> float:
        """Share of training-depth draws at or below max_depth (before clamping), estimated from a
        fixed-seed sample of the Poisson-lognormal (exact 1.0 or 0.0 for a fixed depth)."""
        if self.depth_distribution == "fixed":
            return float(round(self.mean_depth) <= self.max_depth)
        g = torch.Generator().manual_seed(12345)
        mu = math.log(self.mean_depth) - self.depth_sigma ** 2 / 2
        rate = torch.exp(mu + self.depth_sigma * torch.randn(draws, generator=g, dtype=torch.float64, device="cpu"))
        depth = torch.poisson(rate, generator=g) + 1
        return float((depth <= self.max_depth).double().mean())

    def validate(self) -> None:
        check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0 (0: from the tokenizer)")
        self.attention_config().validate()  # model.moe too
        if self.moe.enabled:
            check(self.moe.router == "linear", "model.moe.router", self.moe.router, RMOE_REFUSAL)
        check(self.init_std >= 0, "model.init_std", self.init_std, "must be >= 0 (0: sqrt(2 / (5 d_model)))")
        check(self.embed_scale >= 0, "model.embed_scale", self.embed_scale, "must be >= 0 (0: sqrt(d_model))")
        if self.arch == "ut":
            check(self.max_steps >= 1, "model.max_steps", self.max_steps, "must be >= 1")
            check(0.0 < self.act_eps < 1.0, "model.act_eps", self.act_eps, "must lie in (0, 1) (threshold 1 - act_eps)")
            check(self.ponder_tau >= 0, "model.ponder_tau", self.ponder_tau, "must be >= 0")
            return
        for name in ("n_prelude", "n_coda"):
            check(getattr(self, name) >= 0, f"model.{name}", getattr(self, name), "must be >= 0")
        check(self.n_core >= 1, "model.n_core", self.n_core, "must be >= 1")
        check(self.mean_depth >= 1, "model.mean_depth", self.mean_depth, "must be >= 1 (r < 1 runs no core step)")
        check(self.max_depth >= 1, "model.max_depth", self.max_depth, "must be >= 1 (r_max < 1 runs no core step)")
        check(self.eval_depth >= 0, "model.eval_depth", self.eval_depth, "must be >= 1 (or 0: round(mean_depth))")
        check(self.depth_sigma >= 0, "model.depth_sigma", self.depth_sigma, "must be >= 0")
        check(1 <= self.backprop_depth <= self.max_depth, "model.backprop_depth", self.backprop_depth,
              f"k must lie in [1, max_depth = {self.max_depth}]")
        mass = self.depth_mass()
        check(mass >= MIN_DEPTH_MASS, "model.max_depth", self.max_depth,
              f"the depth distribution ({self.depth_distribution}, mean_depth {self.mean_depth}, sigma "
              f"{self.depth_sigma}) has no mass at or below it ({mass:.2g} of draws); raise max_depth above "
              f"{self.mean_depth:g} or lower mean_depth")
