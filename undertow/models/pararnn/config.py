"""Hyper-parameters of the ParaRNN family (Danieli et al. 2025, arXiv 2510.21450): nonlinear
ParaGRU / ParaLSTM recurrences trained in parallel over time by Newton's method, in a DCLM-style
backbone whose attention is replaced by the cell, mixed with attention and MLP layers by a pattern.

One pre-norm residual block per `layer_pattern` letter (x + mixer(RMSNorm(x))):
  g  ParaGRU block:  v, z = in_proj(x^), gate_proj(x^)           (B, T, d_inner) each
                     c    = SiLU(causal_conv(v))                 depthwise, width conv_width
                     u    = B c + b                              block-diagonal per head: all three
                                                                 gates of a head's channels in one matmul
                     h    = ParaGRU(u; a)                        kernels/pararnn, Newton (`iterations`)
                     out  = out_proj(GatedRMSNorm(h, z))         weight * rmsnorm(h * SiLU(z)) per head
  l  ParaLSTM block: the same with the ParaLSTM cell (coupled input-forget gate, peepholes p)
  *  attention (RoPE, grouped-query, document masks; attn_heads / attn_kv_heads)
  -  SwiGLU MLP (ffn_hidden)
  E  mixture-of-experts SwiGLU MLP (`moe`: linear or RMoE router; the rmoe router's state runs from
     E layer to E layer through the others, models/moe/carry.py)
The paper's model alternates a cell block and an MLP block ("g-g-..." or "l-l-..."), as a DCLM
Transformer alternates attention and MLP.

`heads` splits the d_inner channels into groups: the input projection B is block-diagonal over
them (heads = 1: dense), the gated norm normalizes each group, and tensor parallelism gives each
rank whole groups (tp must divide heads), or with heads = 1 splits the channels (tp must divide
d_inner; plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from undertow.configtools import check, opt
from undertow.models.common.mlp import swiglu_hidden
from undertow.models.moe.config import MoEConfig

LAYER_KINDS = {
    "g": "ParaGRU block (conv, ParaGRU cell, gated norm)",
    "l": "ParaLSTM block (conv, ParaLSTM cell, gated norm)",
    "*": "attention (RoPE, document masks)",
    "-": "MLP (SwiGLU)",
    "E": "MoE MLP (model.moe)",
}
CELLS = {"g": "gru", "l": "lstm"}  # pattern letter -> the kernel's cell name


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass
class ParaRNNConfig:
    vocab_size: int = opt(0, help="0: take the vocabulary size of the data's tokenizer.")
    d_model: int = opt(256, help="Width of the residual stream.")
    layer_pattern: str = opt("g-g-", help="One letter per block: g ParaGRU, l ParaLSTM, * attention, - SwiGLU MLP, "
                                                    "E MoE MLP (model.moe).")
    expand: int = opt(1, help="Cell width d_inner = expand * d_model (the paper: 1).")
    heads: int = opt(4, help="Channel groups of the cell layers: the input projection is block-diagonal over them "
                             "(1: dense), the gated norm normalizes each, tensor parallelism splits them (1: "
                             "by output channel).")
    conv_width: int = opt(4, help="Causal depthwise convolution width before the cell (2..4).")
    conv_bias: bool = opt(True, help="Bias in the causal convolution.")
    iterations: int = opt(3, help="Newton iterations of the parallel solve (>= 1; the paper: 3).")
    tol: float | None = opt(None, help="Stop Newton early once max |residual| <= tol (none: run every iteration).")
    chunk_size: int = opt(64, help="Chunk length of the Newton steps' linear scans.")
    attn_heads: int = opt(4, help="Query heads of `*` layers (head dim d_model / attn_heads, even for RoPE).")
    attn_kv_heads: int = opt(0, help="Key/value heads of `*` layers (0: attn_heads).")
    rope_theta: float = opt(10000.0, help="RoPE base of `*` layers.")
    ffn_hidden: int = opt(0, help="Hidden width of the `-` layers' SwiGLU (0: 8/3 * d_model rounded up to "
                                  "multiple_of).")
    multiple_of: int = opt(64, help="Rounding of the automatic SwiGLU width.")
    norm_eps: float = opt(1e-5, help="RMSNorm epsilon (block, final and gated norms).")
    tie_embeddings: bool = opt(True, help="Share the input embedding and the LM head.")
    init_std: float = opt(0.02, help="Std of the normal init of embedding and projections (output projections "
                                     "scaled by 1/sqrt(2 n_layers)); the cell's B and a have their own (model docs).")
    moe: MoEConfig = opt(factory=MoEConfig, help="The `E` layers' mixture of experts (SwiGLU experts; width "
                                                   "moe.expert_hidden, 0: the `-` layers' width).")

    @property
    def n_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def head_dim(self) -> int:
        """Channels per group of the cell layers."""
        return self.d_inner // self.heads

    @property
    def kv_heads(self) -> int:
        return self.attn_kv_heads or self.attn_heads

    @property
    def hidden(self) -> int:
        """Hidden width of the `-` layers' SwiGLU."""
        return self.ffn_hidden or swiglu_hidden(self.d_model, self.multiple_of)

    def validate(self) -> None:
        check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0 (0: from the tokenizer)")
        check(self.d_model >= 1, "model.d_model", self.d_model, "must be >= 1")
        bad = sorted({c for c in self.layer_pattern if c not in LAYER_KINDS})
        valid = ", ".join(f"{k!r} {v}" for k, v in LAYER_KINDS.items())
        check(bool(self.layer_pattern) and not bad, "model.layer_pattern", self.layer_pattern,
              f"needs at least one letter and only these: {valid}" + (f" (found {bad})" if bad else ""))
        check(self.expand >= 1, "model.expand", self.expand, "must be >= 1")
        check(self.heads >= 1 and self.d_inner % self.heads == 0, "model.heads", self.heads,
              f"must divide the cell width d_inner = expand * d_model = {self.d_inner}; "
              f"valid: {divisors(self.d_inner)[:16]}")
        check(2 <= self.conv_width <= 4, "model.conv_width", self.conv_width, "must be 2, 3 or 4")
        check(self.iterations >= 1, "model.iterations", self.iterations,
              "must be >= 1 (Newton steps per solve; the paper uses 3)")
        check(self.tol is None or self.tol > 0, "model.tol", self.tol,
              "must be > 0, or none to run every Newton iteration")
        check(self.chunk_size >= 1, "model.chunk_size", self.chunk_size, "must be >= 1")
        check(self.ffn_hidden >= 0, "model.ffn_hidden", self.ffn_hidden, "must be >= 0 (0: automatic)")
        check(self.multiple_of >= 1, "model.multiple_of", self.multiple_of, "must be >= 1")
        check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        if "*" in self.layer_pattern:
            self._validate_attention()
        self.moe.validate(required="E" in self.layer_pattern)

    def _validate_attention(self) -> None:
        d = self.d_model
        even = [h for h in divisors(d) if (d // h) % 2 == 0]
        check(self.attn_heads >= 1 and d % self.attn_heads == 0 and (d // self.attn_heads) % 2 == 0,
              "model.attn_heads", self.attn_heads, f"must divide d_model = {d} into an even head dim (RoPE); "
              f"valid: {even[:12]}")
        check(self.attn_kv_heads >= 0 and self.attn_heads % self.kv_heads == 0, "model.attn_kv_heads",
              self.attn_kv_heads, f"must divide attn_heads = {self.attn_heads}; valid: {divisors(self.attn_heads)} "
              "(or 0 = attn_heads)")
        check(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "must be > 0")
