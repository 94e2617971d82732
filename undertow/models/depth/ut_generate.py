"""Universal Transformer decoding with one key/value cache per ACT step.

In the full forward (act.py) step n applies the shared block to every position's step-n state,
halted positions included (their state frozen, the block's output discarded): a running position
attends to every earlier position's keys/values of that step. So the cache holds, for each step n,
the keys/values of each earlier position's step-n state, and a new token runs all `max_steps`
steps (halted or not: later tokens attend to its step-n keys/values) through the same ACT
arithmetic (`ACTLoop.run_steps`) with one position: the logits equal the full forward's.
Memory: max_steps caches, like a max_steps-layer transformer.
"""

from __future__ import annotations

import torch

from undertow.models.common.decoding import KVCache, attention_with_cache, generate_tokens, prompt_rope, token_rope
from undertow.models.common.rope import rope_cos_sin
from undertow.models.depth.blocks import mlp_out


def _block_step(block, x: torch.Tensor, cos, sin, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
    """The transformer block's forward (x + attn(norm x), then + mlp(norm x)) with a key/value cache."""
    out, cache = attention_with_cache(block.attn, block.attn_norm(x), cos, sin, cache)
    x = x + out
    return x + mlp_out(block.mlp, block.mlp_norm(x)), cache


def _run(model, x: torch.Tensor, cos, sin, caches: list[KVCache | None]) -> torch.Tensor:
    """The ACT loop over x (B, T, d) with caches[n] the step-n cache (None: a prefill); updates caches."""
    loop = model.layers[0]

    def apply_block(n, state):
        out, caches[n] = _block_step(loop.block, state, cos, sin, caches[n])
        return out

    return loop.run_steps(x, apply_block)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
    """input_ids (B, T), no padding -> (B, T + max_new_tokens)."""
    def rope(positions):
        return rope_cos_sin(positions, model.cfg.head_dim, model.cfg.rope_theta)

    def prefill(ids):
        caches = [None] * model.layers[0].max_steps
        cos, sin = prompt_rope(rope, ids)
        (x,) = model.embed_stage(ids, {})
        x = _run(model, x, cos, sin, caches)
        return model.head_stage((x[:, -1],)), caches

    def step(tokens, position, caches):
        cos, sin = token_rope(rope, tokens, position)
        (x,) = model.embed_stage(tokens[:, None], {})
        x = _run(model, x, cos, sin, caches)
        return model.head_stage((x[:, 0],))

    return generate_tokens(prefill, step, input_ids, max_new_tokens, greedy)
