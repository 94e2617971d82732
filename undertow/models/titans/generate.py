"""Incremental decoding for TitansLM: the prompt once through the blocks, then one token at a time.

What each block carries (blocks.py): the memory's state at its last chunk boundary with the inputs of
the tokens since (the chunk-start rule of training reproduced exactly), and the attention's cache --
MAG/MAL the keys/values of the last window - 1 positions, MAC the current segment's tokens (its
attention is recomputed over the segment so far) and the memory as it stood at the segment's start.
Nothing grows beyond a window or a segment. The token loop is the shared one (models/common/decoding.py).
"""

from __future__ import annotations

import functools

import torch

from undertow.models.common.decoding import generate_tokens, prompt_rope, token_rope


def prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The prompt (B, T) -> last-position logits (B, V), per-block states."""
    cos, sin = prompt_rope(model.rope, input_ids)
    x = model.embed(input_ids)
    states = []
    for block in model.layers:
        x, state = block.prefill(x, cos, sin)
        states.append(state)
    return model.logits(x[:, -1]), states


def step(model, tokens: torch.Tensor, position: int, states: list) -> torch.Tensor:
    """One new token per row, tokens (B,) at `position` -> logits (B, V); `states` advance in place."""
    cos, sin = token_rope(model.rope, tokens, position)
    x = model.embed(tokens)[:, None]
    for i, block in enumerate(model.layers):
        x, states[i] = block.step(x, states[i], cos, sin)
    return model.logits(x[:, 0])


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
    """input_ids (B, T), one prompt per row, no padding -> (B, T + max_new_tokens)."""
    return generate_tokens(functools.partial(prefill, model), functools.partial(step, model), input_ids,
                           max_new_tokens, greedy=greedy)
