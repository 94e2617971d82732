"""Hyper-parameters of the Titans family (Behrouz et al. 2025, arXiv 2501.00663): attention beside a
neural long-term memory (kernels/titans_memory) in one of the paper's three architectures.

  mac  Memory as a Context: the row is cut into segments of segment_len tokens; each segment's
       attention sees the persistent tokens, the memory's answers to the segment's queries (read from
       the memory as it stood before the segment) and the segment itself (causal); the attention output
       then updates the memory, and the output is gated by the updated memory's read.
  mag  Memory as a Gate: sliding-window attention (window tokens + the persistent tokens) and the
       memory branch side by side on the same input, joined by a gate: out(norm(y) * sigmoid(norm(m))).
  mal  Memory as a Layer: the memory layer, then sliding-window attention, each a residual branch.
Every block ends with a SwiGLU FFN, a mixture of experts with model.moe.n_experts > 0 (linear or
RMoE router: one FFN per block, so the rmoe router's state runs from block to block). The memory's
update rule (loss, momentum, decay, Omega window, clipping) is kernels/titans_memory/rule.py's
UpdateRule, built from the mem_* fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from undertow.configtools import check, opt
from undertow.kernels.titans_memory.rule import UpdateRule
from undertow.models.common.mlp import swiglu_hidden
from undertow.models.moe.config import MoEConfig

VARIANTS = {"mac": "memory as a context", "mag": "memory as a gate", "mal": "memory as a layer"}


def divisors(n: int) -> list[int]:
    return [h for h in range(1, n + 1) if n % h == 0]


@dataclass
class TitansConfig:
    vocab_size: int = opt(0, help="0: take the vocabulary size of the data's tokenizer.")
    d_model: int = opt(128, help="Width of the residual stream.")
    n_layers: int = opt(2, help="Blocks.")
    variant: Literal["mac", "mag", "mal"] = opt("mac", help="mac (memory as a context), mag (as a gate), "
                                                           "mal (as a layer).")
    n_heads: int = opt(4, help="Attention heads (head dim d_model / n_heads, even for RoPE).")
    mem_heads: int = opt(4, help="Memory heads: independent memories of d_model / mem_heads channels.")
    mem_depth: int = opt(2, help="Memory network depth: 1 linear, >= 2 an MLP with a residual.")
    mem_expansion: float = opt(2.0, help="Hidden width of the MLP memory = mem_expansion * memory head dim.")
    chunk_size: int = opt(16, help="Memory chunk: inner gradients at the weights of each chunk's start.")
    segment_len: int = opt(64, help="MAC's attention segment; chunk_size divides it and window fits in it.")
    window: int = opt(64, help="Sliding-window attention width of MAG and MAL (<= segment_len).")
    persistent_tokens: int = opt(4, help="Learned, input-independent tokens every attention query sees.")
    max_lr: float = opt(0.1, help="The inner learning rate theta_t = max_lr * sigmoid(proj(x)).")
    mem_loss: Literal["l2", "huber"] = opt("l2", help="Memory loss (attentional bias): l2 or huber.")
    huber_delta: float = opt(1.0, help="Huber loss threshold.")
    mem_optimizer: Literal["momentum", "sgd"] = opt("momentum", help="Inner optimiser: momentum (Titans) or sgd.")
    mem_retention: Literal["decay", "none"] = opt("decay", help="Forgetting gate alpha_t (decay) or none.")
    omega_window: int = opt(1, help="ATLAS Omega rule: the last c tokens' gated losses (1: Titans).")
    max_grad_norm: float = opt(1.0, help="Clip each token's inner gradient to this norm (0: no clipping).")
    mem_recompute: bool = opt(False, help="Recompute the memory chunk by chunk in the backward (less memory).")
    ffn_hidden: int = opt(0, help="SwiGLU hidden width (0: Llama's 8/3 d_model rounded up to 64).")
    norm_eps: float = opt(1e-6, help="RMSNorm epsilon.")
    rope_theta: float = opt(10000.0, help="RoPE base of the attention.")
    tie_embeddings: bool = opt(False, help="Share the input embedding and the LM head.")
    init_std: float = opt(0.02, help="Std of the normal init of embeddings and projections.")
    moe: MoEConfig = opt(factory=MoEConfig, help="Mixture of experts in place of every block's FFN "
                                                   "(moe.n_experts > 0; expert width moe.expert_hidden, 0: ffn's).")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mem_head_dim(self) -> int:
        return self.d_model // self.mem_heads

    @property
    def mem_hidden(self) -> int:
        return max(1, round(self.mem_expansion * self.mem_head_dim))

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or swiglu_hidden(self.d_model, 64)

    @property
    def rule(self) -> UpdateRule:
        return UpdateRule(loss=self.mem_loss, huber_delta=self.huber_delta, optimizer=self.mem_optimizer,
                          retention=self.mem_retention, window=self.omega_window, max_grad_norm=self.max_grad_norm)

    @property
    def mem_dims(self) -> list[int]:
        """Widths through one head's memory network: Dk -> (hidden ->)* Dv."""
        return [self.mem_head_dim] + [self.mem_hidden] * (self.mem_depth - 1) + [self.mem_head_dim]

    def context_limits(self, seq_len: int) -> list[tuple[str, str, int]]:
        """What context parallelism must divide (ParallelDims.validate's form): a cp slice of a row holds
        whole segments, so memory chunks (which divide segment_len) never straddle two ranks, MAC's
        segment attention stays on one rank and MAG/MAL's window (<= segment_len) reaches only into the
        previous rank's slice (models/titans/context.py). A row of no whole number of segments: cp 1 only."""
        what = (f"seq_len / segment_len = {seq_len} / {self.segment_len} (a cp slice must hold whole segments of "
                f"segment_len tokens: chunks and windows never straddle two ranks)")
        return [("cp", what, seq_len // self.segment_len if seq_len % self.segment_len == 0 else 1)]

    def validate(self) -> None:
        d = self.d_model
        check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0 (0: from the tokenizer)")
        check(d >= 1, "model.d_model", d, "must be >= 1")
        check(self.n_layers >= 1, "model.n_layers", self.n_layers, "must be >= 1")
        check(self.variant in VARIANTS, "model.variant", self.variant,
              "choose one of " + ", ".join(f"{k!r} ({v})" for k, v in VARIANTS.items()))
        even = [h for h in divisors(d) if (d // h) % 2 == 0]
        check(self.n_heads >= 1 and d % self.n_heads == 0 and self.head_dim % 2 == 0, "model.n_heads",
              self.n_heads, f"must divide d_model = {d} into an even head dim (RoPE); valid: {even[:12]}")
        check(self.mem_heads >= 1 and d % self.mem_heads == 0, "model.mem_heads", self.mem_heads,
              f"must divide d_model = {d}; valid: {divisors(d)[:16]}")
        check(isinstance(self.mem_depth, int) and self.mem_depth >= 1, "model.mem_depth", self.mem_depth,
              "must be an int >= 1 (1: a linear memory, >= 2: an MLP with a residual)")
        check(self.mem_expansion > 0, "model.mem_expansion", self.mem_expansion, "must be > 0")
        check(self.segment_len >= 1, "model.segment_len", self.segment_len, "must be >= 1")
        check(self.chunk_size >= 1 and self.segment_len % self.chunk_size == 0, "model.chunk_size", self.chunk_size,
              f"must divide segment_len = {self.segment_len} (memory chunks never straddle a segment); "
              f"valid: {divisors(self.segment_len)}")
        check(1 <= self.window <= self.segment_len, "model.window", self.window,
              f"must be in 1..segment_len = {self.segment_len} (the sliding window fits in one segment)")
        check(self.persistent_tokens >= 0, "model.persistent_tokens", self.persistent_tokens, "must be >= 0")
        check(self.max_lr > 0, "model.max_lr", self.max_lr, "must be > 0")
        check(self.huber_delta > 0, "model.huber_delta", self.huber_delta, "must be > 0")
        check(self.mem_optimizer in ("momentum", "sgd"), "model.mem_optimizer", self.mem_optimizer,
              "choose 'momentum' or 'sgd'")
        check(self.mem_retention in ("decay", "none"), "model.mem_retention", self.mem_retention,
              "choose 'decay' or 'none'")
        check(self.mem_loss in ("l2", "huber"), "model.mem_loss", self.mem_loss, "choose 'l2' or 'huber'")
        check(isinstance(self.omega_window, int) and self.omega_window >= 1, "model.omega_window",
              self.omega_window, "must be an int >= 1 (1: Titans' rule)")
        check(self.max_grad_norm >= 0, "model.max_grad_norm", self.max_grad_norm, "must be >= 0 (0: no clipping)")
        check(self.ffn_hidden >= 0, "model.ffn_hidden", self.ffn_hidden, "must be >= 0 (0: automatic)")
        check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        check(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "must be > 0")
        check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        self.moe.validate()
