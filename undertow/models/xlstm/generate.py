"""Incremental decoding for XLSTMLM: the prompt once through the blocks, then one token at a time.

What each block carries from token to token (float32 recurrent states; the cache of the FFNs and
norms is nothing, they work per token):
  m  the mLSTM state (C (B, H, Dqk, Dv), n (B, H, Dqk), m (B, H))
  M  the conv window (B, E, K-1) and the mLSTM state of its heads
  s  the conv window (B, d, K-1) and the sLSTM state (y, c, n, m), each (B, H, Dh)
  *  a key/value cache that grows by one position per token (RoPE at the token's position)
  -  nothing
The prompt's states come from the kernels' `return_final_state`; every new token takes one step of
each recurrence from them (mlstm_step, the conv step, the sLSTM kernel for one step). Only the
attention cache grows with the text. The token loop is the shared one (models/common/decoding.py).
"""

from __future__ import annotations

import functools

import torch

from undertow.models.common.decoding import generate_tokens, prompt_rope, token_rope


def prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The prompt (B, T) -> last-position logits (B, V), per-block states (None for MLPs)."""
    B, T = input_ids.shape
    cos, sin = prompt_rope(model.rope, input_ids)
    x = model.embed(input_ids)
    router = model.add_router_state(x, input_ids)[1:]  # the rmoe router's h_0 (B, T, r), or nothing
    states = []
    for block in model.layers:
        if block.kind == "E":  # per token; the router state runs over the layers, not the positions
            x, *router = model.call_layer(block, (x, *router))
            state = None
        elif block.kind == "*":
            x, state = block.prefill(x, cos, sin)
        elif block.kind == "-":
            x, state = block(x), None
        else:
            x, state = block.prefill(x)
        states.append(state)
    return model.logits(x[:, -1]), states


def step(model, tokens: torch.Tensor, position: int, states: list) -> torch.Tensor:
    """One new token per row, tokens (B,) at `position` -> logits (B, V); `states` advance in place."""
    cos, sin = token_rope(model.rope, tokens, position)
    x = model.embed(tokens)
    router = model.add_router_state(x, tokens)[1:]
    for i, block in enumerate(model.layers):
        if block.kind == "E":
            x, *router = model.call_layer(block, (x, *router))
        elif block.kind == "*":
            x, states[i] = block.step(x, states[i], cos, sin)
        elif block.kind == "-":
            x = block(x)
        else:
            x, states[i] = block.step(x, states[i])
    return model.logits(x)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
    """input_ids (B, T), one prompt per row, no padding -> (B, T + max_new_tokens)."""
    return generate_tokens(functools.partial(prefill, model), functools.partial(step, model), input_ids,
                           max_new_tokens, greedy=greedy)
