"""The token loop of incremental decoding, shared by the families that decode with carried state.

A family supplies two functions over its own per-layer states (recurrent states, KV caches):
    prefill(input_ids (B, T)) -> (logits of the last position (B, V), states)
    step(tokens (B,), position, states) -> logits (B, V), updating `states` in place
and `generate_tokens` picks the next token from the logits and feeds it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


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
