"""Packed rows -> the batch dict the model reads.

A row is T = seq_len input tokens made of consecutive document segments. Rows of one source overlap
by one token: a row covers stream tokens [kT, kT + T] (T + 1 tokens), its inputs are the first T and
its labels the last T, so the final label of a row is the first input of the next row of that source.
Every token is an input exactly once and every next-token pair inside a document is a label exactly
once; pairs that straddle two documents are masked.

Batch (B = batch_size, T = seq_len):

    input_ids     (B, T) int64   token ids; `pad_id` where padded
    labels        (B, T) int64   the next token; -100 where it belongs to another document or is padding
    position_ids  (B, T) int64   position within the segment: 0 at each document start and at row start
    doc_ids       (B, T) int32   segment index within the row: 0, 1, 2, ...; a document cut by the row
                                 end continues in the next row as a new segment; padding is one more
                                 segment (labels -100), so every token belongs to one
    cu_seqlens    (S + 1,) int32 cumulative segment lengths over the flattened B*T tokens (segments never
                                 cross rows; cu_seqlens[-1] == B*T), for flash-attn varlen
    max_seqlen    int            the longest segment

Padding only appears at the very end of a one-pass run (split "val" or loop=False).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class Row:
    """The content of one row before tensors are made."""

    pieces: list[np.ndarray] = field(default_factory=list)  # document segments, total length <= T
    next_token: int | None = None  # token after the row, when the last segment's document continues


def pack_rows(rows: list[Row], seq_len: int, batch_size: int, pad_id: int = 0) -> dict:
    """Build the batch dict (see the module docstring) from up to `batch_size` rows; missing rows
    and the unfilled end of a short row are padding."""
    if len(rows) > batch_size:
        raise ValueError(f"got {len(rows)} rows for batch_size={batch_size}")
    B, T = batch_size, seq_len
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty((B, T), dtype=np.int64)
    doc_ids = np.empty((B, T), dtype=np.int32)
    positions = np.arange(T, dtype=np.int64)
    segment_lengths: list[int] = []
    for b in range(B):
        pieces = rows[b].pieces if b < len(rows) else []
        start = 0
        for segment, piece in enumerate(pieces):
            end = start + len(piece)
            input_ids[b, start:end] = piece
            labels[b, start : end - 1] = piece[1:]
            position_ids[b, start:end] = positions[: len(piece)]
            doc_ids[b, start:end] = segment
            segment_lengths.append(len(piece))
            start = end
        if start > T:
            raise ValueError(f"row {b} holds {start} tokens, more than seq_len={T}")
        if start == T and rows[b].next_token is not None:
            labels[b, T - 1] = rows[b].next_token
        if start < T:
            position_ids[b, start:] = positions[: T - start]
            doc_ids[b, start:] = len(pieces)
            segment_lengths.append(T - start)
    cu_seqlens = np.zeros(len(segment_lengths) + 1, dtype=np.int32)
    np.cumsum(segment_lengths, out=cu_seqlens[1:])
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "doc_ids": torch.from_numpy(doc_ids),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(max(segment_lengths)),
    }
