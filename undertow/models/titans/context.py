"""Context parallelism of the Titans blocks: the memory state and the sliding window's last keys
passed serially from cp rank to cp rank.

Each cp rank holds a contiguous slice of every row (parallel/context.py), a whole number of segments
(TitansConfig.context_limits refuses anything else at config load): memory chunks never straddle two
ranks, MAC's segment attention is local to its rank, and the sliding window (<= segment_len) reaches
at most window - 1 tokens into the previous rank's slice.

The mixing of a block runs as one serial op (kernels/context.py's SerialPassing; parallel/
context_serial.py does the sends): rank r receives from rank r - 1 the state its slice starts from,
runs the block's mixing on its slice, and sends on the state it ends with; the backward sends the
state's gradient back the same way. The state is flat float32 tensors:
    the memory (kernels/titans_memory/context.py: weights, momentum, Omega window, live flag), and for
    MAG/MAL the attention's tail: keys and values of the slice's last window - 1 tokens (B, w-1, Hkv, D)
    and a flag per tail token (B, w-1), 1 where it is in the document of the slice's last token.
Rows whose document starts at the receiving rank's first token arrive zeroed (context_serial.py):
live = 0 restarts the memory from M_0, tail flags 0 hide the previous rank's keys.

One op per block (not one for the memory and one for the attention) keeps the sends and receives of
a rank pair in one order, forward and backward. Cost: the mixing is serial over the cp ranks (rank r
starts a block when rank r - 1 has finished it: one block takes cp x one slice's time, while the ranks
overlap across blocks as in a pipeline, n_layers + cp - 1 slice-blocks per forward) and activations
are split like every other op's; traffic per rank boundary and direction, one memory state
(2 x heads x sum Din Dout floats per row) plus MAG/MAL's 2 x (window - 1) x d_model tail.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from undertow.kernels.context import SerialPassing, context_parallel_op


def block_handler(shapes: Callable[[], list[tuple[int, ...]]]):
    """None outside context parallelism. Under it, `handler(fn, h, cos, sin, doc_ids=...)` runs
    fn(h, cos, sin, doc_ids=..., initial_state=None | flat tuple, return_final_state=True) -> (out,
    flat state after the slice) on this rank's slice from the state the previous rank ends with and
    returns out; `shapes()`: the flat state's shapes for this slice's rows."""
    return context_parallel_op("titans_block", SerialPassing(state_shapes=lambda args, kwargs: shapes()))


def tail_of(k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, n: int):
    """The last n positions' keys and values (B, n, Hkv, D) and flags (B, n) float32: 1 where the
    token is in the document of the slice's last token."""
    k_tail, v_tail = k[:, k.shape[1] - n:], v[:, v.shape[1] - n:]
    if doc_ids is None:
        flags = k.new_ones(k.shape[0], n, dtype=torch.float32)
    else:
        flags = (doc_ids[:, doc_ids.shape[1] - n:] == doc_ids[:, -1:]).float()
    return k_tail, v_tail, flags


def tail_mask(flags: torch.Tensor, doc_ids: torch.Tensor | None, T: int) -> torch.Tensor:
    """(B, 1, T, n) bool: local query i sees tail key j (global offset j - n from the slice start) when
    i - (j - n) < window = n + 1, i.e. j >= i, the key is live, and query i is in the slice's first
    document (the one the tail continues)."""
    n = flags.shape[1]
    i = torch.arange(T, device=flags.device)
    in_window = torch.arange(n, device=flags.device)[None, :] >= i[:, None]  # (T, n)
    first_doc = (torch.ones(flags.shape[0], T, dtype=torch.bool, device=flags.device) if doc_ids is None
                 else doc_ids == doc_ids[:, :1])
    return (in_window[None] & (flags[:, None, :] > 0) & first_doc[:, :, None])[:, None]
