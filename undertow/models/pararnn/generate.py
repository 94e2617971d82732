"""Incremental decoding for ParaRNNLM: the prompt once through the full forward, then one token at a
time on the carried states.

What each block carries from token to token:
  g, l  the conv window (B, D, K-1) and the cell state (GRU h (B, D); LSTM (c, h)), float32: the
        prompt's come from the kernels' final states (the Newton solve's last token), each new
        token takes one conv step and one step of the cell itself (ParaRNNMixer.step)
  *     a key/value cache that grows by one position per token (RoPE at the token's position)
  -, E  nothing (an `E` block is per token; the rmoe router's state runs over the blocks, not the
        positions: it starts at 0 for each forward and passes from E block to E block)
The token loop is the shared one (models/common/decoding.py).
"""

from __future__ import annotations

import functools

import torch

from undertow.models.common.decoding import attention_with_cache, generate_tokens, prompt_rope, token_rope


def prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The prompt (B, T) -> last-position logits (B, V), per-block states (None for MLPs)."""
    cos, sin = prompt_rope(model.rope, input_ids)
    x = model.embed(input_ids)
    router = model.add_router_state(x, input_ids)[1:]  # the rmoe router's h_0 (B, T, r), or nothing
    states = []
    for block in model.layers:
        if block.is_moe:
            x, *router = model.call_layer(block, (x, *router))
            states.append(None)
            continue
        h = block.norm(x)
        if block.kind == "*":
            out, state = attention_with_cache(block.mixer, h, cos, sin, None)
        elif block.kind == "-":
            out, state = block.mixer(h), None
        else:
            out, state = block.mixer(h, return_state=True)
        x = x + out
        states.append(state)
    return model.logits(x[:, -1]), states


def step(model, tokens: torch.Tensor, position: int, states: list) -> torch.Tensor:
    """One new token per row, tokens (B,) at `position` -> logits (B, V); `states` advance in place."""
    cos, sin = token_rope(model.rope, tokens, position)
    x = model.embed(tokens)
    router = model.add_router_state(x, tokens)[1:]
    for i, block in enumerate(model.layers):
        if block.is_moe:
            x, *router = model.call_layer(block, (x, *router))
            continue
        h = block.norm(x)
        if block.kind == "*":
            out, states[i] = attention_with_cache(block.mixer, h[:, None], cos, sin, states[i])
            out = out[:, 0]
        elif block.kind == "-":
            out = block.mixer(h)
        else:
            out, states[i] = block.mixer.step(h, states[i])
        x = x + out
    return model.logits(x)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
    """input_ids (B, T), one prompt per row, no padding -> (B, T + max_new_tokens)."""
    return generate_tokens(functools.partial(prefill, model), functools.partial(step, model), input_ids,
                           max_new_tokens, greedy=greedy)
