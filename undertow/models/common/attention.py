"""Causal attention that respects document boundaries, dispatched to flash-attn or SDPA.

Backends:
  flash  flash-attn's varlen kernel (`flash_attn_varlen_func`), used when flash-attn is
         installed, the tensors are on CUDA and in fp16/bf16; documents are given by cu_seqlens.
  sdpa   torch.nn.functional.scaled_dot_product_attention with a block-diagonal causal mask
         built from doc_ids (or plain causal when there are no boundaries).

The choice is logged once. `backend=` or the environment variable UNDERTOW_ATTENTION_BACKEND
forces one and fails loudly if it cannot run; nothing falls back silently.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from undertow.log import get_logger
from undertow.kernels.context import context_parallel_op

BACKENDS = ("flash", "sdpa")
_logged: set[str] = set()


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _log_once(backend: str, why: str) -> None:
    if backend not in _logged:
        _logged.add(backend)
        get_logger("undertow.attention").info("attention backend: %s (%s)", backend, why)


def select_backend(q: torch.Tensor, backend: str | None = None) -> str:
    forced = backend or os.environ.get("UNDERTOW_ATTENTION_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"attention backend {forced!r} is unknown; choose one of {BACKENDS}")
        if forced == "flash":
            if not flash_available():
                raise RuntimeError("attention backend 'flash' was forced but flash-attn is not installed")
            if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
                raise RuntimeError(f"attention backend 'flash' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
        _log_once(forced, "forced")
        return forced
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_available():
        _log_once("flash", "flash-attn installed, CUDA half-precision tensors")
        return "flash"
    _log_once("sdpa", "flash-attn unavailable for these tensors")
    return "sdpa"


def document_causal_mask(doc_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """doc_ids: (B, T) -> bool mask (B, 1, T, T), True where query i may attend key j (j <= i, the
    same document, and i - j < window when a sliding window is given)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0 (grouped-query attention).

    doc_ids (B, T) and/or cu_seqlens (S+1,) over the flattened B*T tokens mark documents;
    no token attends across a boundary. window: a sliding window, each query sees its last
    `window` keys (itself included); None: all earlier keys. Returns (B, T, H, D).
    """
    handler = context_parallel_op("attention")
    if handler is not None:  # context parallelism: local queries against the whole row's keys
        if window is not None:
            raise NotImplementedError("sliding-window attention under context parallelism is not implemented")
        return handler(causal_attention, q, k, v, doc_ids=doc_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                       backend=backend)
    B, T, H, D = q.shape
    if H % k.shape[2] != 0:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {k.shape[2]}")
    chosen = select_backend(q, backend)
    if chosen == "flash":
        from flash_attn import flash_attn_varlen_func

        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
            max_seqlen = T
        out = flash_attn_varlen_func(
            q.reshape(B * T, H, D),
            k.reshape(B * T, k.shape[2], D),
            v.reshape(B * T, v.shape[2], D),
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            causal=True,
            window_size=(-1, -1) if window is None else (window - 1, 0),
        )
        return out.reshape(B, T, H, D)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    gqa = kt.shape[1] != H
    if doc_ids is None and (window is None or window >= T):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        if doc_ids is None:
            doc_ids = torch.zeros(B, T, dtype=torch.long, device=q.device)
        mask = document_causal_mask(doc_ids, window)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)
