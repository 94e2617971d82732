"""Incremental decoding for XLSTMLM: the prompt once through the blocks, then one token at a time.

Each mLSTM layer carries its recurrent state (C (B, H, Dqk, Dv), n (B, H, Dqk), m (B, H), float32):
the prompt's final state comes from the kernel's `return_final_state`, and every new token takes
one step of the recurrence from it (the kernel's `mlstm_step`, the body of its reference loop).
The FFN and the norms work per token and carry nothing, so the cache is one (C, n, m) per block
and does not grow with the text. The token loop is the shared one (models/common/decoding.py).
"""

from __future__ import annotations

import functools

import torch

from undertow.models.common.decoding import generate_tokens


def prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The prompt (B, T) -> last-position logits (B, V), per-block states."""
    x = model.embed(input_ids)
    states = []
    for block in model.layers:
        x, state = block.prefill(x)
        states.append(state)
    return model.logits(x[:, -1]), states


def step(model, tokens: torch.Tensor, position: int, states: list) -> torch.Tensor:
    """One new token per row, tokens (B,) -> logits (B, V); `states` advance in place. (`position` is
    unused: the recurrent state is all the model knows of the past.)"""
    x = model.embed(tokens)
    for i, block in enumerate(model.layers):
        x, states[i] = block.step(x, states[i])
    return model.logits(x)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
    """input_ids (B, T), one prompt per row, no padding -> (B, T + max_new_tokens)."""
    return generate_tokens(functools.partial(prefill, model), functools.partial(step, model), input_ids,
                           max_new_tokens, greedy=greedy)
