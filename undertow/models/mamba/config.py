"""Hyper-parameters of Mamba-1, Falcon-Mamba, Mamba-2 and hybrid stacks (one config for all).

The stack is spelled by `layer_pattern`, one letter per layer (Megatron-LM's hybrid notation):
`m` Mamba-1 mixer, `M` Mamba-2 mixer, `*` attention, `-` MLP, `E` mixture-of-experts MLP (`moe`). Every layer is a pre-norm residual
block around its mixer. `mlp` picks the `-` layers' MLP (SwiGLU, or Megatron-LM's default
fc1 -> exact GELU -> fc2) and `position_embedding` whether `*` layers rotate queries and keys (RoPE)
or use no positional encoding (Megatron-LM's `--position-embedding-type none`: the recurrent layers
carry the order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from undertow.configtools import check, opt
from undertow.models.common.mlp import swiglu_hidden
from undertow.models.moe.config import MoEConfig
from undertow.models.transformer.config import TransformerConfig

LAYER_KINDS = {"m": "Mamba-1 mixer", "M": "Mamba-2 mixer", "*": "attention", "-": "MLP", "E": "MoE MLP (model.moe)"}
MLP_KINDS = {"swiglu": "down(silu(gate x) * up x)", "gelu": "fc2(gelu(fc1 x)), Megatron-LM's default"}
POSITION_EMBEDDINGS = {"rope": "rotary embeddings on queries and keys", "none": "no positional encoding"}


@dataclass
class MambaConfig:
    vocab_size: int = opt(0, help="0: take the vocabulary size of the data's tokenizer.")
    d_model: int = opt(256, help="Width of the residual stream.")
    layer_pattern: str = opt("mmmm", help="One letter per layer: m Mamba-1, M Mamba-2, * attention, - MLP (kind: `mlp`).")
    d_state: int = opt(16, help="SSM state size N (per channel for Mamba-1, per head for Mamba-2).")
    d_conv: int = opt(4, help="Causal depthwise convolution width (2..4).")
    expand: int = opt(2, help="Inner width d_inner = expand * d_model.")
    dt_rank: int = opt(0, help="Mamba-1 rank of the dt projection (0: ceil(d_model / 16)).")
    dt_min: float = opt(0.001, help="Smallest initial step size dt.")
    dt_max: float = opt(0.1, help="Largest initial step size dt.")
    dt_init_floor: float = opt(1e-4, help="Initial dt values are floored at this.")
    conv_bias: bool = opt(True, help="Bias in the causal convolution.")
    proj_bias: bool = opt(False, help="Biases in the mixers' input and output projections.")
    falcon_norm: bool = opt(False, help="Mamba-1: weightless RMSNorm on dt, B and C (Falcon-Mamba).")
    headdim: int = opt(64, help="Mamba-2 head dim P (heads = d_inner / headdim).")
    ngroups: int = opt(1, help="Mamba-2 groups sharing B and C (and the gated norm's groups).")
    chunk_size: int = opt(64, help="Mamba-2 SSD chunk length (chunked and Triton kernels).")
    n_heads: int = opt(4, help="Attention query heads (head dim = d_model / n_heads; even with RoPE).")
    n_kv_heads: int = opt(0, help="Attention key/value heads (0: same as n_heads).")
    position_embedding: Literal["rope", "none"] = opt(
        "rope", help="Positions in `*` layers: rope (rotary, base rope_theta) or none (no positional encoding, "
                     "Megatron-LM's --position-embedding-type none).")
    rope_theta: float = opt(10000.0, help="Attention RoPE base (position_embedding = rope).")
    mlp: Literal["swiglu", "gelu"] = opt(
        "swiglu", help="MLP of `-` layers: swiglu (gate, up, down) or gelu (fc1 -> exact GELU -> fc2, no biases; "
                       "Megatron-LM's default MLP).")
    ffn_hidden: int = opt(0, help="Hidden width of the `-` layers' MLP (0: swiglu 8/3 * d_model rounded up to "
                                  "multiple_of; gelu 4 * d_model).")
    multiple_of: int = opt(64, help="Rounding of the automatic SwiGLU width.")
    norm_eps: float = opt(1e-5, help="RMSNorm epsilon (block, final and Mamba-2 gated norms).")
    mixer_norm_eps: float = opt(1e-6, help="Epsilon of the weightless RMSNorm on dt, B, C (falcon_norm; Falcon-Mamba's mixer_rms_eps).")
    tie_embeddings: bool = opt(True, help="Share the input embedding and the LM head.")
    init_std: float = opt(0.02, help="Std of the normal initialization (output projections scaled by 1/sqrt(2 n_layers)).")
    moe: MoEConfig = opt(factory=MoEConfig, help="The `E` layers' mixture of experts (SwiGLU experts; width "
                                                   "moe.expert_hidden, 0: the `-` layers' SwiGLU width).")
    residual_in_fp32: bool = opt(True, help="Keep the residual stream in float32 even when weights are half precision.")

    @property
    def n_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        """The effective Mamba-1 dt rank."""
        return self.dt_rank or math.ceil(self.d_model / 16)

    @property
    def nheads(self) -> int:
        """Mamba-2 heads."""
        return self.d_inner // self.headdim

    @property
    def hidden(self) -> int:
        """Hidden width of the `-` layers' MLP."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return 4 * self.d_model if self.mlp == "gelu" else swiglu_hidden(self.d_model, self.multiple_of)

    def attention_config(self) -> TransformerConfig:
        """The transformer config that `*` layers (transformer `Attention`) are built from."""
        return TransformerConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, rope_theta=self.rope_theta, norm_eps=self.norm_eps, init_std=self.init_std,
        )

    def validate(self) -> None:
        check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0 (0: from the tokenizer)")
        check(self.d_model >= 1, "model.d_model", self.d_model, "must be >= 1")
        bad = sorted({c for c in self.layer_pattern if c not in LAYER_KINDS})
        valid = ", ".join(f"{k!r} {v}" for k, v in LAYER_KINDS.items())
        check(bool(self.layer_pattern) and not bad, "model.layer_pattern", self.layer_pattern,
              f"needs at least one letter and only these: {valid}" + (f" (found {bad})" if bad else ""))
        check(self.expand >= 1, "model.expand", self.expand, "must be >= 1")
        check(self.d_state >= 1, "model.d_state", self.d_state, "must be >= 1")
        check(2 <= self.d_conv <= 4, "model.d_conv", self.d_conv, "must be 2, 3 or 4")
        check(self.dt_rank >= 0, "model.dt_rank", self.dt_rank, "must be >= 0 (0: ceil(d_model / 16))")
        check(self.dt_min > 0, "model.dt_min", self.dt_min, "must be > 0")
        check(self.dt_max >= self.dt_min, "model.dt_max", self.dt_max, f"must be >= dt_min ({self.dt_min})")
        check(self.dt_init_floor > 0, "model.dt_init_floor", self.dt_init_floor, "must be > 0")
        check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        check(self.mixer_norm_eps > 0, "model.mixer_norm_eps", self.mixer_norm_eps, "must be > 0")
        check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        if "M" in self.layer_pattern:
            self._validate_mamba2()
        if "*" in self.layer_pattern:
            self.attention_config().validate(rope=self.position_embedding == "rope")
        check(self.mlp in MLP_KINDS, "model.mlp", self.mlp,
              "choose one of " + ", ".join(f"{k!r} ({v})" for k, v in MLP_KINDS.items()))
        check(self.position_embedding in POSITION_EMBEDDINGS, "model.position_embedding", self.position_embedding,
              "choose one of " + ", ".join(f"{k!r} ({v})" for k, v in POSITION_EMBEDDINGS.items()))
        check(self.ffn_hidden >= 0, "model.ffn_hidden", self.ffn_hidden, "must be >= 0")
        check(self.multiple_of >= 1, "model.multiple_of", self.multiple_of, "must be >= 1")
        self.moe.validate(required="E" in self.layer_pattern)

    def _validate_mamba2(self) -> None:
        divisors = [p for p in range(1, self.d_inner + 1) if self.d_inner % p == 0]
        check(self.headdim >= 1 and self.d_inner % self.headdim == 0, "model.headdim", self.headdim,
              f"must divide d_inner = expand * d_model = {self.d_inner}; valid: {divisors[:16]}")
        groups = [g for g in range(1, self.nheads + 1) if self.nheads % g == 0]
        check(self.ngroups in groups, "model.ngroups", self.ngroups,
              f"must divide the Mamba-2 heads (d_inner / headdim = {self.nheads}); valid: {groups}")
        check(self.chunk_size >= 1, "model.chunk_size", self.chunk_size, "must be >= 1")
