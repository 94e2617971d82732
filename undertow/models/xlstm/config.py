"""Hyper-parameters of the xLSTM family: xLSTM-7B's mLSTM blocks (arXiv 2503.13427), the original
xLSTM paper's sLSTM and mLSTM blocks (arXiv 2405.04517) and attention / MLP layers, mixed by a pattern.

One block per `layer_pattern` letter ('' = n_layers `m` blocks). The paper's xLSTM[a:b] (a mLSTM
blocks per b sLSTM blocks) is a pattern of `M` and `s`, e.g. xLSTM[7:1] over 8 blocks "MMMMMsMM";
hybrids add `*` and `-` as the Mamba family's patterns do ("msm*-").

  m  xLSTM-7B:  x += out_proj(sigmoid(ogate(x^)) * MultiHeadNorm(mLSTM(q, k, v, i~, f~))), x^ = RMSNorm(x);
                x += SwiGLU(RMSNorm(x)). q/k have qk_dim = qk_dim_factor * d_model channels, v v_dim =
                v_dim_factor * d_model, split over n_heads (7B: 4096 * 0.5 / 8 = 256, 4096 / 8 = 512).
  s  paper sLSTM block (post-up-projection): x^ = Norm(x); c = SiLU(conv(x^)); gates i, f from c and
                z, o from x^ through block-diagonal (per head) projections; sLSTM with block-diagonal R;
                x += GroupNorm(y) per head; x += GeGLU(Norm(x)) of width slstm_ffn_factor * d_model.
  M  paper mLSTM block (pre-up-projection): x^ = Norm(x); a, z = up_a(x^), up_z(x^) (up_proj_factor
                * d_model each); c = SiLU(conv(a)); q, k from c and v from a (block-diagonal, blocks of
                up_qkv_block); i~, f~ = Linear([q, k, v]); h = mLSTM(q, k, v, i~, f~);
                x += down((GroupNorm(h) + skip * c) * SiLU(z)).
  *  attention: x += Attention(RMSNorm(x)), RoPE, causal with document masks (attn_heads heads).
  -  MLP: x += SwiGLU(RMSNorm(x)) of the `m` blocks' FFN width.
  E  MoE MLP: x += MoE(RMSNorm(x)), SwiGLU experts (model.moe), linear or RMoE router.

Norm is the paper's LayerNorm (no bias) or RMSNorm (`paper_norm`). Automatic widths (SwiGLU, the
sLSTM FFN, the `M` up-projection) are rounded up to ffn_round_up_to_multiple_of, as the xLSTM code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from undertow.kernels.mlstm.limits import MAX_DQK
from undertow.configtools import check, opt
from undertow.models.moe.config import MoEConfig

LAYER_KINDS = {
    "m": "xLSTM-7B mLSTM block (mLSTM layer + SwiGLU FFN)",
    "s": "xLSTM paper sLSTM block (conv, sLSTM, GroupNorm + gated GeLU FFN)",
    "M": "xLSTM paper mLSTM block (up-projection, conv, mLSTM, learnable skip, SiLU gate)",
    "*": "attention (RoPE, document masks)",
    "-": "MLP (SwiGLU)",
    "E": "MoE MLP (model.moe; SwiGLU experts)",
}
PAPER_NORMS = {"layernorm": "LayerNorm without bias (the paper's)", "rmsnorm": "RMSNorm"}


def round_up(x: float, multiple: int) -> int:
    """x rounded up to a multiple of `multiple`, computed as transformers' xLSTMConfig does (so an
    exported width is the one transformers rebuilds)."""
    return int(((x + multiple - 1) // multiple) * multiple)


def divisors(n: int) -> list[int]:
    return [h for h in range(1, n + 1) if n % h == 0]


@dataclass
class XLSTMConfig:
    vocab_size: int = opt(0, help="0: take the vocabulary size of the data's tokenizer.")
    d_model: int = opt(256, help="Width of the residual stream.")
    n_layers: int = opt(4, help="Blocks.")
    layer_pattern: str = opt("", help="One letter per block, n_layers long ('' = all m): m xLSTM-7B mLSTM, "
                                      "s paper sLSTM, M paper mLSTM, * attention, - MLP.")
    n_heads: int = opt(4, help="mLSTM heads (must divide qk_dim and v_dim).")
    qk_dim_factor: float = opt(0.5, help="Query/key width qk_dim = qk_dim_factor * d_model (a whole number).")
    v_dim_factor: float = opt(1.0, help="Value width v_dim = v_dim_factor * d_model (a whole number).")
    ffn_proj_factor: float = opt(2.667, help="SwiGLU width = ffn_proj_factor * d_model rounded up (ffn_hidden = 0).")
    ffn_round_up_to_multiple_of: int = opt(64, help="Rounding of the automatic widths: SwiGLU, sLSTM FFN, "
                                                    "M up-projection.")
    ffn_hidden: int = opt(0, help="SwiGLU hidden width (0: from ffn_proj_factor and its rounding).")
    gate_soft_cap: float = opt(15.0, help="Input/forget gate pre-activations are cap * tanh(x / cap) (0: no cap).")
    logit_soft_cap: float = opt(30.0, help="Logits are cap * tanh(x / cap) (0: no cap).")
    norm_eps: float = opt(1e-6, help="Epsilon of the RMSNorms and of the per-head norm.")
    mlstm_eps: float = opt(1e-6, help="Epsilon added to the mLSTM's denominator max(|n^T q|, exp(-m)).")
    chunk_size: int = opt(64, help="mLSTM chunk length of the chunkwise kernels.")
    tie_embeddings: bool = opt(False, help="Share the input embedding and the LM head (xLSTM-7B: no).")
    init_std: float = opt(0.0, help="Std of the normal init of embedding, head and input projections "
                                    "(0: xLSTM-7B's small init sqrt(2 / (5 d_model))).")
    igate_bias_init: float = opt(-10.0, help="Initial input-gate bias (every head).")
    fgate_bias_init_min: float = opt(3.0, help="Initial forget-gate biases: linspace(min, max) over the heads.")
    fgate_bias_init_max: float = opt(6.0, help="See fgate_bias_init_min.")
    paper_norm: Literal["layernorm", "rmsnorm"] = opt("layernorm", help="Pre-norms of the s and M blocks: "
                                                      "layernorm (no bias, the paper's) or rmsnorm.")
    paper_norm_eps: float = opt(1e-5, help="Epsilon of the s and M blocks' pre-norms and per-head GroupNorms.")
    conv_kernel: int = opt(4, help="Causal depthwise conv width of the s and M blocks (2..4).")
    slstm_heads: int = opt(4, help="sLSTM heads (block-diagonal gates and R; must divide d_model).")
    slstm_ffn_factor: float = opt(1.3, help="sLSTM block's gated GeLU FFN width = factor * d_model, rounded up.")
    up_proj_factor: float = opt(2.0, help="M block inner width = factor * d_model, rounded up.")
    up_heads: int = opt(4, help="M block mLSTM heads (must divide its inner width).")
    up_qkv_block: int = opt(4, help="M block q/k/v block-diagonal block size (must divide the head dim).")
    attn_heads: int = opt(0, help="Query heads of `*` layers (0: n_heads); head dim d_model / attn_heads, even.")
    attn_kv_heads: int = opt(0, help="Key/value heads of `*` layers (0: attn_heads).")
    rope_theta: float = opt(10000.0, help="RoPE base of `*` layers.")
    moe: MoEConfig = opt(factory=MoEConfig, help="The `E` layers' mixture of experts (expert width "
                                                 "moe.expert_hidden, 0: the SwiGLU width).")

    @property
    def pattern(self) -> str:
        return self.layer_pattern or "m" * self.n_layers

    @property
    def qk_dim(self) -> int:
        return round(self.d_model * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return round(self.d_model * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.n_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.n_heads

    @property
    def hidden(self) -> int:
        """SwiGLU hidden width (xLSTM-7B: 4096 * 2.667 rounded up to 64 = 10944)."""
        return self.ffn_hidden or round_up(self.d_model * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    @property
    def slstm_ffn_hidden(self) -> int:
        """Width of the sLSTM block's gated GeLU FFN (paper: 1.3 * d_model rounded up to 64)."""
        return round_up(self.d_model * self.slstm_ffn_factor, self.ffn_round_up_to_multiple_of)

    @property
    def up_inner(self) -> int:
        """Inner width of the M block (paper: 2 * d_model rounded up to 64)."""
        return round_up(self.d_model * self.up_proj_factor, self.ffn_round_up_to_multiple_of)

    @property
    def q_heads(self) -> int:
        """Query heads of the attention layers."""
        return self.attn_heads or self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.attn_kv_heads or self.q_heads

    @property
    def small_init_std(self) -> float:
        return self.init_std or math.sqrt(2.0 / (5.0 * self.d_model))

    def validate(self) -> None:
        check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0 (0: from the tokenizer)")
        check(self.d_model >= 1, "model.d_model", self.d_model, "must be >= 1")
        check(self.n_layers >= 1, "model.n_layers", self.n_layers, "must be >= 1")
        self._validate_pattern()
        for name in ("qk_dim_factor", "v_dim_factor"):
            factor = getattr(self, name)
            width = self.d_model * factor
            check(factor > 0 and abs(width - round(width)) < 1e-9 and round(width) >= 1, f"model.{name}", factor,
                  f"must be > 0 and make d_model * {name} = {self.d_model} * {factor} a whole number of channels")
        common = math.gcd(self.qk_dim, self.v_dim)
        heads = [h for h in range(1, common + 1) if common % h == 0]
        check(self.n_heads >= 1 and common % self.n_heads == 0, "model.n_heads", self.n_heads,
              f"must divide qk_dim = {self.qk_dim} and v_dim = {self.v_dim}; valid: {heads[:16]}")
        if "m" in self.pattern:  # the 7B block's heads go to the chunkwise kernel whole
            fits = [h for h in heads if self.qk_dim // h <= MAX_DQK]
            check(self.qk_head_dim <= MAX_DQK, "model.n_heads", self.n_heads,
                  f"gives a q/k head width of {self.qk_head_dim}, above the mLSTM kernel's one-tile limit of "
                  f"{MAX_DQK}; valid n_heads: {fits[:16]}")
        check(self.ffn_proj_factor > 0, "model.ffn_proj_factor", self.ffn_proj_factor, "must be > 0")
        check(self.ffn_round_up_to_multiple_of >= 1, "model.ffn_round_up_to_multiple_of",
              self.ffn_round_up_to_multiple_of, "must be >= 1")
        check(self.ffn_hidden >= 0, "model.ffn_hidden", self.ffn_hidden, "must be >= 0 (0: from ffn_proj_factor)")
        check(self.gate_soft_cap >= 0, "model.gate_soft_cap", self.gate_soft_cap, "must be >= 0 (0: no cap)")
        check(self.logit_soft_cap >= 0, "model.logit_soft_cap", self.logit_soft_cap, "must be >= 0 (0: no cap)")
        check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        check(self.mlstm_eps > 0, "model.mlstm_eps", self.mlstm_eps, "must be > 0")
        check(self.chunk_size >= 1, "model.chunk_size", self.chunk_size, "must be >= 1")
        check(self.init_std >= 0, "model.init_std", self.init_std, "must be >= 0 (0: sqrt(2 / (5 d_model)))")
        check(self.fgate_bias_init_max >= self.fgate_bias_init_min, "model.fgate_bias_init_max",
              self.fgate_bias_init_max, f"must be >= fgate_bias_init_min ({self.fgate_bias_init_min})")
        kinds = set(self.pattern)
        self.moe.validate(required="E" in kinds)
        if kinds & {"s", "M"}:
            self._validate_paper_blocks(kinds)
        if "*" in kinds:
            self._validate_attention()

    def _validate_pattern(self) -> None:
        pattern = self.layer_pattern
        bad = sorted({c for c in pattern if c not in LAYER_KINDS})
        valid = ", ".join(f"{k!r} {v}" for k, v in LAYER_KINDS.items())
        check(not bad, "model.layer_pattern", pattern, f"unknown letters {bad}; valid: {valid}")
        check(not pattern or len(pattern) == self.n_layers, "model.layer_pattern", pattern,
              f"has {len(pattern)} letters but n_layers = {self.n_layers}: give one letter per block, or '' for "
              "n_layers mLSTM blocks")

    def _validate_paper_blocks(self, kinds: set[str]) -> None:
        check(self.paper_norm in PAPER_NORMS, "model.paper_norm", self.paper_norm,
              "choose one of " + ", ".join(f"{k!r} ({v})" for k, v in PAPER_NORMS.items()))
        check(self.paper_norm_eps > 0, "model.paper_norm_eps", self.paper_norm_eps, "must be > 0")
        check(2 <= self.conv_kernel <= 4, "model.conv_kernel", self.conv_kernel, "must be 2, 3 or 4 (the paper: 4)")
        if "s" in kinds:
            check(self.slstm_heads >= 1 and self.d_model % self.slstm_heads == 0, "model.slstm_heads",
                  self.slstm_heads, f"must divide d_model = {self.d_model}; valid: {divisors(self.d_model)[:16]}")
            check(self.slstm_ffn_factor > 0, "model.slstm_ffn_factor", self.slstm_ffn_factor, "must be > 0")
        if "M" in kinds:
            check(self.up_proj_factor > 0, "model.up_proj_factor", self.up_proj_factor, "must be > 0")
            inner = self.up_inner
            check(self.up_heads >= 1 and inner % self.up_heads == 0, "model.up_heads", self.up_heads,
                  f"must divide the M block's inner width {inner}; valid: {divisors(inner)[:16]}")
            head_dim = inner // self.up_heads
            check(self.up_qkv_block >= 1 and head_dim % self.up_qkv_block == 0, "model.up_qkv_block",
                  self.up_qkv_block, f"must divide the M block's head dim {head_dim} (so each q/k/v block stays "
                  f"inside a head); valid: {divisors(head_dim)[:16]}")

    def _validate_attention(self) -> None:
        d = self.d_model
        even = [h for h in divisors(d) if (d // h) % 2 == 0]
        check(self.attn_heads >= 0 and d % self.q_heads == 0 and (d // self.q_heads) % 2 == 0, "model.attn_heads",
              self.attn_heads, f"(0: n_heads = {self.n_heads}) must divide d_model = {d} into an even head dim "
              f"(RoPE); valid: {even[:12]}")
        check(self.attn_kv_heads >= 0 and self.q_heads % self.kv_heads == 0, "model.attn_kv_heads",
              self.attn_kv_heads, f"must divide the query heads {self.q_heads}; valid: {divisors(self.q_heads)} "
              "(or 0 = the query heads)")
        check(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "must be > 0")
