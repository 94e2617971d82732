"""Incremental decoding for TitansLM: the prompt once through the blocks, then one token at a time.

What each block carries (blocks.py): the memory's state at its last chunk boundary with the inputs of
the tokens since (the chunk-start rule of training reproduced exactly), and the attention's cache --
MAG/MAL the keys/values of the last window - 1 positions, MAC the current segment's tokens (its
attention is recomputed over the segment so far) and the memory as it stood at the segment's start.
Nothing grows beyond a window or a segment. An MoE FFN carries nothing across positions (the rmoe
router's state runs over the blocks: it starts at 0 for each token and passes from block to block,
`through_block`). The token loop is the shared one (models/common/decoding.py).
"""

from __future__ import annotations

import functools

import torch

from undertow.models.common.decoding import generate_tokens, prompt_rope, token_rope


def through_block(model, block, run, carried: tuple, *args) -> tuple[tuple, object]:
    """run(x, *args[, router_state=, router_gru=]) -> (out, state) of one block (its prefill or step) on
    the carried activations (x[, the rmoe router's state]) -> (the carried activations after it, state)."""
    if not block.is_moe:
        out, state = run(carried[0], *args)
        return (out, *carried[1:]), state
    (x, router), state = run(carried[0], *args, router_state=carried[1] if len(carried) > 1 else None,
                             router_gru=model.router_gru)
    return ((x,) if router is None else (x, router)), state


def prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The prompt (B, T) -> last-position logits (B, V), per-block states."""
    cos, sin = prompt_rope(model.rope, input_ids)
    carried = model.add_router_state(model.embed(input_ids), input_ids)
    states = []
    for block in model.layers:
        carried, state = through_block(model, block, block.prefill, carried, cos, sin)
        states.append(state)
    return model.logits(carried[0][:, -1]), states


def step(model, tokens: torch.Tensor, position: int, states: list) -> torch.Tensor:
    """One new token per row, tokens (B,) at `position` -> logits (B, V); `states` advance in place."""
    cos, sin = token_rope(model.rope, tokens, position)
    carried = model.add_router_state(model.embed(tokens)[:, None], tokens[:, None])
    for i, block in enumerate(model.layers):
        carried, states[i] = through_block(model, block, block.step, carried, states[i], cos, sin)
    return model.logits(carried[0][:, 0])


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
    """input_ids (B, T), one prompt per row, no padding -> (B, T + max_new_tokens)."""
    return generate_tokens(functools.partial(prefill, model), functools.partial(step, model), input_ids,
                           max_new_tokens, greedy=greedy)
