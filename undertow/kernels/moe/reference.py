"""The dropless mixture-of-experts computation as a loop over experts: the spec.

Every token goes to each of its top-k experts (no capacity factor, nothing dropped):

    out[n] = sum_j  weights[n, j] * expert_{idx[n, j]}(x[n])
    expert_e(x) = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]        (SwiGLU)

Shapes: x (N, d); idx (N, k) int64 expert ids in [0, E); weights (N, k); w_gate, w_up (E, d, h);
w_down (E, h, d). Returns (N, d) in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_expert(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x (n, d), w_gate/w_up (d, h), w_down (h, d) -> (n, d)."""
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def moe_reference(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """For each expert: the (token, slot) pairs routed to it, its SwiGLU on those tokens, the outputs
    weighted and added back at their tokens. An expert that got no tokens does nothing."""
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        if token.numel() == 0:
            continue
        y = swiglu_expert(x[token], w_gate[e], w_up[e], w_down[e])
        out = out.index_add(0, token, (y * weights[token, slot, None].to(y.dtype)).to(out.dtype))
    return out
