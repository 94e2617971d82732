"""Hyper-parameters of the xLSTM family: xLSTM-7B's mLSTM blocks (arXiv 2503.13427).

One block per `layer_pattern` letter, each two pre-RMSNorm residual branches:

    x = x + out_proj(sigmoid(ogate(x^)) * MultiHeadNorm(mLSTM(q, k, v, i~, f~)))   x^ = RMSNorm(x)
    x = x + SwiGLU(RMSNorm(x))

Head dimensions: queries and keys have qk_dim = qk_dim_factor * d_model channels, values v_dim =
v_dim_factor * d_model, both split over n_heads (xLSTM-7B: 4096 * 0.5 / 8 = 256 and 4096 / 8 = 512).
The letters of the paper's `xLSTM[a:b]` mixing are reserved: `s` (sLSTM block) and `*` (attention
block) are refused until they are built, so a config naming them fails at load, not mid-run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from undertow.configtools import check, opt

LAYER_KINDS = {"m": "mLSTM block (mLSTM layer + SwiGLU FFN, xLSTM-7B)"}
PLANNED_KINDS = {"s": "sLSTM block", "*": "attention block"}


def round_up(x: float, multiple: int) -> int:
    """x rounded up to a multiple of `multiple`, computed as transformers' xLSTMConfig does (so an
    exported width is the one transformers rebuilds)."""
    return int(((x + multiple - 1) // multiple) * multiple)


@dataclass
class XLSTMConfig:
    vocab_size: int = opt(0, help="0: take the vocabulary size of the data's tokenizer.")
    d_model: int = opt(256, help="Width of the residual stream.")
    n_layers: int = opt(4, help="Blocks.")
    layer_pattern: str = opt("", help="One letter per block, n_layers long: m mLSTM ('' = all m). "
                                      "s sLSTM and * attention are planned, not built yet.")
    n_heads: int = opt(4, help="mLSTM heads (must divide qk_dim and v_dim).")
    qk_dim_factor: float = opt(0.5, help="Query/key width qk_dim = qk_dim_factor * d_model (a whole number).")
    v_dim_factor: float = opt(1.0, help="Value width v_dim = v_dim_factor * d_model (a whole number).")
    ffn_proj_factor: float = opt(2.667, help="SwiGLU width = ffn_proj_factor * d_model rounded up (ffn_hidden = 0).")
    ffn_round_up_to_multiple_of: int = opt(64, help="Rounding of the automatic SwiGLU width.")
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

    def _validate_pattern(self) -> None:
        pattern = self.layer_pattern
        planned = sorted({c for c in pattern if c in PLANNED_KINDS})
        check(not planned, "model.layer_pattern", pattern,
              "; ".join(f"{c!r} ({PLANNED_KINDS[c]}) is not implemented yet" for c in planned)
              + f"; the implemented letters: {LAYER_KINDS}")
        bad = sorted({c for c in pattern if c not in LAYER_KINDS})
        check(not bad, "model.layer_pattern", pattern, f"unknown letters {bad}; valid: {LAYER_KINDS}")
        check(not pattern or len(pattern) == self.n_layers, "model.layer_pattern", pattern,
              f"has {len(pattern)} letters but n_layers = {self.n_layers}: give one letter per block, or '' for "
              "n_layers mLSTM blocks")
