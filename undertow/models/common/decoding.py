"""Incremental decoding pieces shared by the families that decode with carried state.

The token loop: a family supplies two functions over its own per-layer states (recurrent states,
KV caches):
    prefill(input_ids (B, T)) -> (logits of the last position (B, V), states)
    step(tokens (B,), position, states) -> logits (B, V), updating `states` in place
and `generate_tokens` picks the next token from the logits and feeds it back.

The single-token steps of layers several families contain: the depthwise causal conv + SiLU in
front of a recurrence (Mamba, the xLSTM paper's blocks) and attention with a key/value cache
(the hybrids' `*` layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from undertow.models.common.attention import causal_attention


@torch.no_grad()
def generate_tokens(prefill: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
                    step: Callable[[torch.Tensor, int, Any], torch.Tensor],
                    input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
    """input_ids (B, T), one prompt per row, no padding -> (B, T + max_new_tokens).
    greedy: argmax; otherwise samples from softmax(logits) (seed torch for reproducibility)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens} must be >= 0")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt length >= 1), got shape {tuple(input_ids.shape)}")

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if greedy:
            return logits.argmax(-1)
        return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)[:, 0]

    if max_new_tokens == 0:
        return input_ids
    logits, states = prefill(input_ids)
    token = pick(logits)
    out = [input_ids, token[:, None]]
    for i in range(1, max_new_tokens):
        logits = step(token, input_ids.shape[1] + i - 1, states)
        token = pick(logits)
        out.append(token[:, None])
    return torch.cat(out, dim=1)


def prompt_rope(rope, input_ids: torch.Tensor):
    """The rotary tables for a prompt: input_ids (B, T) at positions 0..T-1 -> rope's (cos, sin)."""
    B, T = input_ids.shape
    return rope(torch.arange(T, device=input_ids.device).expand(B, T))


def token_rope(rope, tokens: torch.Tensor, position: int):
    """The rotary tables for one new token per row: tokens (B,) at `position` -> rope's (cos, sin), (B, 1)."""
    return rope(torch.full((tokens.shape[0], 1), position, device=tokens.device))


def conv_step(window: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """One step of the depthwise causal conv + SiLU (kernels/causal_conv1d for one token).
    window: (B, D, K-1) float32, oldest first (the kernel's final_state); x: (B, D); weight (D, K).
    Returns y (B, D) in x's dtype and the next window."""
    full = torch.cat([window, x.float().unsqueeze(-1)], dim=-1)  # (B, D, K)
    y = (full * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return F.silu(y).to(x.dtype), full[:, :, 1:]


@dataclass
class KVCache:
    """Keys (after RoPE, when used) and values of the positions so far: (B, L, n_kv_heads, head_dim) each."""

    k: torch.Tensor
    v: torch.Tensor


def attention_with_cache(attn, h: torch.Tensor, cos, sin, cache: KVCache | None):
    """`attn` a transformer `Attention` (its `project` and `o_proj`); h: (B, T, d_model); cos/sin:
    (B, T, head_dim) of these positions (None without RoPE). Without a cache: causal attention over
    the T positions (prefill); with one: T must be 1 and the token attends to every cached position
    and itself. Returns (B, T, d_model), the cache including these positions."""
    B, T, _ = h.shape
    q, k, v = attn.project(h, cos, sin)
    if cache is None:
        out = causal_attention(q, k, v)
    else:
        if T != 1:
            raise ValueError(f"a cached attention step takes one token at a time, got {T}")
        k, v = torch.cat([cache.k, k], dim=1), torch.cat([cache.v, v], dim=1)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=kt.shape[1] != qt.shape[1]).transpose(1, 2)
    return attn.o_proj(out.reshape(B, T, -1)), KVCache(k, v)
