"""Hyper-parameters of the Llama-style baseline decoder."""

from dataclasses import dataclass

from undertow.configtools import check, opt
from undertow.models.common.mlp import swiglu_hidden
from undertow.models.moe.config import MoEConfig


@dataclass
class TransformerConfig:
    vocab_size: int = opt(0, help="0: take the vocabulary size of the data's tokenizer.")
    d_model: int = opt(256, help="Width of the residual stream.")
    n_layers: int = opt(4, help="Decoder blocks.")
    n_heads: int = opt(4, help="Query heads (head dim = d_model / n_heads, even).")
    n_kv_heads: int = opt(0, help='Key/value heads for grouped-query attention (0: same as n_heads).')
    ffn_hidden: int = opt(0, help='SwiGLU width (0: 8/3 * d_model rounded up to multiple_of).')
    multiple_of: int = opt(64, help="Rounding of the automatic SwiGLU width.")
    rope_theta: float = opt(10000.0, help="RoPE base.")
    norm_eps: float = opt(1e-5, help="RMSNorm epsilon.")
    tie_embeddings: bool = opt(True, help="Share the input embedding and the LM head.")
    init_std: float = opt(0.02, help="Std of the normal initialization (output projections scaled by 1/sqrt(2 n_layers)).")
    moe: MoEConfig = opt(factory=MoEConfig, help="Mixture of experts in place of every block's MLP (moe.n_experts > 0).")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or swiglu_hidden(self.d_model, self.multiple_of)

    def validate(self, rope: bool = True) -> None:
        """`rope`: whether queries and keys are rotated (RoPE pairs the head dim's halves, so it must
        be even); hybrids' attention without position embedding passes False."""
        check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0 (0: from the tokenizer)")
        check(self.d_model >= 1, "model.d_model", self.d_model, "must be >= 1")
        check(self.n_layers >= 1, "model.n_layers", self.n_layers, "must be >= 1")
        check(self.n_heads >= 1, "model.n_heads", self.n_heads, "must be >= 1")
        even = 2 if rope else 1
        divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and (self.d_model // h) % even == 0]
        check(
            self.d_model % self.n_heads == 0 and self.head_dim % even == 0,
            "model.n_heads",
            self.n_heads,
            f"must divide d_model={self.d_model} into {'an even' if rope else 'a whole'} head dim; valid: {divisors[:12]}",
        )
        valid_kv = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
        check(
            self.n_kv_heads == 0 or self.n_kv_heads in valid_kv,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide n_heads={self.n_heads}; valid: {valid_kv} (or 0 = n_heads)",
        )
        check(self.ffn_hidden >= 0, "model.ffn_hidden", self.ffn_hidden, "must be >= 0")
        check(self.multiple_of >= 1, "model.multiple_of", self.multiple_of, "must be >= 1")
        check(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "must be > 0")
        check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        self.moe.validate()
