"""Context parallelism for causal attention: all-gather K/V, attend with global positions.

Rank r holds queries of tokens [r T, (r+1) T) (T = the local length). It all-gathers K and V of the
whole row (one differentiable collective for both; its backward reduce-scatters their gradients
back to the ranks that own them) and the row's doc_ids, and runs SDPA of its queries against all
keys with the mask "key position <= query position and same document". RoPE needs nothing here:
the model rotates q and k with the global position_ids that `shard_batch` keeps.

Cost per rank: K/V of the whole row (memory O(T_global) per layer) and a (B, T, T_global) mask;
a ring exchange that overlaps compute and skips the all-masked blocks is the next step when
attention dominates. flash-attn under CP is not implemented: forcing it raises.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from undertow.log import get_logger
from undertow.parallel.context_comm import all_gather, gather_along_dim

_logged = False


def global_causal_mask(doc_ids_local: torch.Tensor | None, doc_ids_all: torch.Tensor | None, rank: int,
                       length: int, total: int, device) -> torch.Tensor:
    """Bool (B or 1, 1, length, total): query i of this rank (global position rank*length + i) may
    attend key j when j <= its position and both are in the same document."""
    query_pos = rank * length + torch.arange(length, device=device)
    mask = torch.arange(total, device=device)[None, :] <= query_pos[:, None]  # (length, total)
    if doc_ids_local is None:
        return mask[None, None]
    same_doc = doc_ids_local[:, :, None] == doc_ids_all[:, None, :]
    return (mask[None] & same_doc)[:, None]


def attention_handler(cp, fn, q, k, v, *, doc_ids=None, cu_seqlens=None, max_seqlen=None, backend=None):
    """The CP form of `causal_attention(q, k, v, ...)`: q (B, T, H, D), k/v (B, T, Hkv, D) of this
    rank's slice -> (B, T, H, D). cu_seqlens/max_seqlen are ignored: doc_ids mark documents."""
    global _logged
    forced = backend or os.environ.get("UNDERTOW_ATTENTION_BACKEND") or None
    if forced == "flash":
        raise NotImplementedError("attention backend 'flash' under context parallelism is not implemented; "
                                  "CP attention runs SDPA over all-gathered K/V (unset the forced backend)")
    if not _logged:
        _logged = True
        get_logger("undertow.parallel").info("attention under context parallelism: all-gather K/V, SDPA, cp=%d",
                                             cp.world)
    T, H = q.shape[1], q.shape[2]
    kv = gather_along_dim(torch.cat([k, v], dim=2), 1, cp.group)  # (B, world * T, 2 Hkv, D)
    k_all, v_all = kv.split(k.shape[2], dim=2)
    doc_all = torch.cat(all_gather(doc_ids, cp.group), dim=1) if doc_ids is not None else None
    mask = global_causal_mask(doc_ids, doc_all, cp.rank, T, kv.shape[1], q.device)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_all, v_all))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=kt.shape[1] != H)
    return out.transpose(1, 2)

