"""The linear recurrence under every Newton step, x_t = J_t x_{t-1} + r_t (x_{-1} = 0), solved in
parallel over time by a chunked scan, for J diagonal (S = 1, the GRU) or 2x2 blocks per channel
(S = 2, the LSTM).

With chunks of L tokens:
  1. inside every chunk at once, sequentially over its L steps: the chunk's own solution from a
     zero carry, x~_l = J_l x~_{l-1} + r_l, and its cumulative transition P_l = J_l ... J_0;
  2. across chunks, sequentially over the summaries: carry_c = P^c_{L-1} carry_{c-1} + x~^c_{L-1};
  3. the fix-up, parallel: x^c_l = x~^c_l + P^c_l carry_{c-1}.
Sequential steps: L + T / L instead of T. Unrolling the recurrence shows why step 3 is exact:
x_l = J_l ... J_0 x_{-1} + (the terms of the chunk's own r's) = P_l carry + x~_l.
"""

from __future__ import annotations

import torch


def matvec(J: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J (..., S, S, D) applied per channel to v (..., S, D) -> (..., S, D)."""
    if J.shape[-2] == 1:
        return J[..., 0, :, :] * v
    return (J * v.unsqueeze(-3)).sum(-2)


def matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per-channel products of S x S blocks: (..., S, S, D) @ (..., S, S, D) -> (..., S, S, D)."""
    if A.shape[-2] == 1:
        return A * B
    return (A.unsqueeze(-2) * B.unsqueeze(-4)).sum(-3)


def linear_recurrence(J: torch.Tensor, r: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """J: (B, T, S, S, D), r: (B, T, S, D) -> x (B, T, S, D) with x_t = J_t x_{t-1} + r_t, x_{-1} = 0.
    J_0 multiplies the zero x_{-1}, so it never matters."""
    B, T, S, _, D = J.shape
    L = min(chunk_size, T)
    chunks = -(-T // L)
    pad = chunks * L - T
    if pad:  # zero steps after the end: they change nothing before it, and are cut off below
        J = torch.nn.functional.pad(J, (0, 0, 0, 0, 0, 0, 0, pad))
        r = torch.nn.functional.pad(r, (0, 0, 0, 0, 0, pad))
    # time-major inside the chunks: (L, B, chunks, ...), so every step below reads and writes one block
    Jc = J.view(B, chunks, L, S, S, D).movedim(2, 0).contiguous()
    x = r.view(B, chunks, L, S, D).movedim(2, 0).contiguous()
    # step 1: each chunk's solution from a zero carry (in place over r's copy) and its transitions
    for l in range(1, L):
        x[l] += matvec(Jc[l], x[l - 1])
    if S == 1:
        P = torch.cumprod(Jc, 0)
    else:
        P = Jc.clone()
        for l in range(1, L):
            P[l] = matmul(Jc[l], P[l - 1])
    # step 2: the carry entering each chunk, a sequential scan of the chunk summaries
    incoming = torch.empty_like(x[0])  # (B, chunks, S, D)
    carry = torch.zeros_like(x[0, :, 0])
    for c in range(chunks):
        incoming[:, c] = carry
        carry = matvec(P[L - 1, :, c], carry) + x[L - 1, :, c]
    # step 3: the fix-up, every token at once
    x += matvec(P, incoming)
    return x.movedim(0, 2).reshape(B, chunks * L, S, D)[:, :T]


def reverse_linear_recurrence(J: torch.Tensor, g: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """The adjoint recurrence of `linear_recurrence`: lam_t = J_{t+1}^T lam_{t+1} + g_t, lam_T = 0.
    J: (B, T, S, S, D), g: (B, T, S, D) -> lam (B, T, S, D). Solved as a forward recurrence in
    reversed time with the transposed blocks shifted by one token."""
    shifted = torch.zeros_like(J)
    shifted[:, :-1] = J[:, 1:].transpose(-3, -2)
    return linear_recurrence(shifted.flip(1), g.flip(1), chunk_size).flip(1)


def linear_recurrence_with_transitions(J: torch.Tensor, r: torch.Tensor, chunk_size: int = 64, solve=None) -> tuple:
    """`linear_recurrence` from a zero carry and the cumulative transitions P_t = J_t ... J_0, so that
    the solution from a carry x_{-1} is x_t = x~_t + P_t x_{-1} (what a context-parallel slice needs:
    its carry comes from the ranks before it). J: (B, T, S, S, D), r: (B, T, S, D) -> (x~ (B, T, S, D),
    P (B, T, S, S, D)). Column i of P_t solves the same recurrence with r_0 = J_0 e_i and r_t = 0
    after, so all S + 1 solves run as one scan over a batch S + 1 times larger. `solve(J, r)`: the
    scan to use (None: `linear_recurrence` with chunk_size; the Triton one on CUDA, context.py)."""
    B, T, S, _, D = J.shape
    solve = solve or (lambda J, r: linear_recurrence(J, r, chunk_size))
    columns = torch.zeros(S, B, T, S, D, dtype=r.dtype, device=r.device)
    columns[:, :, 0] = J[:, 0].permute(2, 0, 1, 3)  # (S_col, B, S_row, D): column i of J_0
    stacked = solve(J.repeat(S + 1, 1, 1, 1, 1), torch.cat((r, columns.flatten(0, 1))))
    x, cols = stacked[:B], stacked[B:].view(S, B, T, S, D)
    return x, cols.permute(1, 2, 3, 0, 4)  # P[b, t, row, col, d]


def reverse_linear_recurrence_with_transitions(J: torch.Tensor, g: torch.Tensor, chunk_size: int = 64,
                                               solve=None) -> tuple:
    """`reverse_linear_recurrence` from a zero carry after the end and its transitions Q_t =
    J_{t+1}^T ... J_{T-1}^T (Q_{T-1} = I), so that with a carry c entering the last token (lam_{T-1} =
    g_{T-1} + c) the solution is lam_t = lam~_t + Q_t c. J: (B, T, S, S, D), g: (B, T, S, D) ->
    (lam~ (B, T, S, D), Q (B, T, S, S, D)); the columns of Q solve it with g = e_i at the last token.
    `solve(J, g)`: the reverse scan to use (None: `reverse_linear_recurrence` with chunk_size)."""
    B, T, S, _, D = J.shape
    solve = solve or (lambda J, g: reverse_linear_recurrence(J, g, chunk_size))
    columns = torch.zeros(S, B, T, S, D, dtype=g.dtype, device=g.device)
    columns[:, :, -1] = torch.eye(S, dtype=g.dtype, device=g.device)[:, None, :, None]
    stacked = solve(J.repeat(S + 1, 1, 1, 1, 1), torch.cat((g, columns.flatten(0, 1))))
    lam, cols = stacked[:B], stacked[B:].view(S, B, T, S, D)
    return lam, cols.permute(1, 2, 3, 0, 4)
