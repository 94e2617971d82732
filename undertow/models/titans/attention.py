"""Titans' attention: the transformer's grouped-query projections and RoPE, with the persistent memory
(learned, input-independent tokens that every query sees, the paper's section 3.3) and a sliding window.

Without persistent tokens the attention goes through models/common/attention.py's dispatch (flash-attn
with its sliding window, or SDPA). Persistent tokens make a mask flash-attn's varlen kernel cannot
express (keys before the window that every query sees, across documents), so with them the layer
calls SDPA with an explicit boolean mask: [persistent keys: always | the row's keys: causal, same
document, within the window]. MAC adds the memory's answers as more keys (block.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from undertow.models.common.attention import causal_attention, document_causal_mask
from undertow.models.common.shards import local_shard
from undertow.models.titans.config import TitansConfig
from undertow.models.titans.context import tail_mask, tail_of
from undertow.models.transformer.config import TransformerConfig
from undertow.models.transformer.model import Attention


def last(t: torch.Tensor, n: int) -> torch.Tensor:
    """The last n positions of t (B, T, ...) (all of them when T < n)."""
    return t[:, max(0, t.shape[1] - n):]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, T, H, D); k, v (B, S, Hkv, D); mask (B, 1, T, S) bool or None (all visible) -> (B, T, H, D)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=kt.shape[1] != qt.shape[1])
    return out.transpose(1, 2)


class PersistentAttention(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model). `attn` holds q/k/v/o (named as the transformer's, so its
    tensor-parallel styles apply); `persistent` (P, d_model) the persistent tokens, projected by the
    same k/v projections without RoPE."""

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.attn = Attention(TransformerConfig(vocab_size=1, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                                n_heads=cfg.n_heads, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps))
        self.persistent = nn.Parameter(torch.empty(cfg.persistent_tokens, cfg.d_model))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn.init_weights(std, out_std)
        nn.init.normal_(self.persistent, std=1.0)  # tokens in the normed residual stream's scale

    def persistent_kv(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, Hkv, head_dim) keys and values of the persistent tokens."""
        P, hd = self.persistent.shape[0], self.attn.head_dim
        k, v = self.attn.k_proj(self.persistent), self.attn.v_proj(self.persistent)
        shape = (1, P, k.shape[-1] // hd, hd)  # heads from the width (this rank's under TP): P may be 0
        return k.view(shape).expand(batch, -1, -1, -1), v.view(shape).expand(batch, -1, -1, -1)

    def forward(self, x, cos, sin, doc_ids=None, cu_seqlens=None, max_seqlen=None, window: int | None = None):
        B, T, _ = x.shape
        q, k, v = self.attn.project(x, cos, sin)
        if self.persistent.shape[0] == 0:
            out = causal_attention(q, k, v, doc_ids=doc_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                   window=window)
        else:
            pk, pv = self.persistent_kv(B)
            ids = doc_ids if doc_ids is not None else torch.zeros(B, T, dtype=torch.long, device=x.device)
            mask = torch.cat([torch.ones(B, 1, T, pk.shape[1], dtype=torch.bool, device=x.device),
                              document_causal_mask(ids, window)], -1)
            out = attend(q, torch.cat([pk, k], 1), torch.cat([pv, v], 1), mask)
        return self.attn.o_proj(out.reshape(B, T, -1))

    # ---- context parallelism: the previous cp rank's last window - 1 keys/values (context.py)
    def tail_shapes(self, batch: int, window: int) -> list[tuple[int, ...]]:
        """Shapes of the tail a slice passes on: keys, values (B, window - 1, Hkv, D), flags (B, window - 1)."""
        hd = self.attn.head_dim
        kv = (batch, window - 1, local_shard(self.attn.k_proj.weight).shape[0] // hd, hd)
        return [kv, kv, (batch, window - 1)]

    def forward_tail(self, x, cos, sin, doc_ids, window: int, tail):
        """forward's output on a cp slice whose window reaches into the previous rank's: `tail` (keys,
        values, flags: context.tail_of's of the previous slice, None on the first rank) -> (out, this
        slice's tail)."""
        B, T, _ = x.shape
        q, k, v = self.attn.project(x, cos, sin)
        pk, pv = self.persistent_kv(B)
        ids = doc_ids if doc_ids is not None else torch.zeros(B, T, dtype=torch.long, device=x.device)
        keys, values = [pk], [pv]
        masks = [torch.ones(B, 1, T, pk.shape[1], dtype=torch.bool, device=x.device)]
        if tail is not None:
            keys.append(tail[0].to(k.dtype))
            values.append(tail[1].to(v.dtype))
            masks.append(tail_mask(tail[2], doc_ids, T))
        keys, values = torch.cat([*keys, k], 1), torch.cat([*values, v], 1)
        out = attend(q, keys, values, torch.cat([*masks, document_causal_mask(ids, window)], -1))
        return self.attn.o_proj(out.reshape(B, T, -1)), tail_of(k, v, doc_ids, window - 1)

    # ---- decoding with a sliding-window key/value cache
    def prefill(self, x, cos, sin, window: int):
        """A prompt -> forward's output and the cache: keys/values of its last window - 1 positions."""
        out = self.forward(x, cos, sin, window=window)
        _, k, v = self.attn.project(x, cos, sin)
        return out, (last(k, window - 1), last(v, window - 1))

    def step(self, x, cache, cos, sin, window: int):
        """One token x (B, 1, d_model), cos/sin of its position -> (B, 1, d_model), the next cache."""
        q, k, v = self.attn.project(x, cos, sin)
        k, v = torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)
        pk, pv = self.persistent_kv(x.shape[0])
        out = attend(q, torch.cat([pk, k], 1), torch.cat([pv, v], 1), None)
        cache = (last(k, window - 1), last(v, window - 1))
        return self.attn.o_proj(out.reshape(x.shape[0], 1, -1)), cache
