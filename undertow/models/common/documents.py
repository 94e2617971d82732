"""Two spellings of the document boundaries of a packed batch, and the way between them.

    doc_ids     (B, T) int32   segment index per token; a segment never crosses a row
    cu_seqlens  (S + 1,) int32 cumulative segment lengths over the flattened B*T tokens (flash-attn varlen)
"""

from __future__ import annotations

import torch


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """cu_seqlens (S+1,) over the flattened batch * seq_len tokens -> segment index (batch, seq_len) int32."""
    tokens = torch.arange(batch * seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens, tokens, right=True) - 1
    return segment.view(batch, seq_len).to(torch.int32)


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> cu_seqlens (S+1,) int32: a segment starts at every row start and wherever
    doc_ids changes within a row."""
    B, T = doc_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.nonzero(starts.reshape(-1)).reshape(-1)
    end = torch.tensor([B * T], device=doc_ids.device, dtype=first.dtype)
    return torch.cat([first, end]).to(torch.int32)


def recurrent_layer_context(rope, input_shape, device, position_ids=None, doc_ids=None, cu_seqlens=None,
                            max_seqlen=None) -> dict:
    """The keyword arguments of every block of a stack that mixes recurrences with attention: the
    documents as doc_ids (B, T) (from cu_seqlens when only those are given: the recurrences reset
    where doc_ids change) and as cu_seqlens/max_seqlen (flash-attn's varlen), and the attention
    layers' RoPE tables `rope(position_ids)` -> (cos, sin) or (None, None)."""
    B, T = input_shape
    if doc_ids is None and cu_seqlens is not None:
        doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, B, T)
    if position_ids is None:
        position_ids = torch.arange(T, device=device).expand(B, T)
    cos, sin = rope(position_ids)
    return {"cos": cos, "sin": sin, "doc_ids": doc_ids, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
