"""Huginn decoding with key/value caches: a test-time depth, adaptive exit per token, and the core's
cache dense (one per step) or shared across steps.

Prefill runs the prompt through every block once with caches (models/common/decoding.py's
attention_with_cache), the core at `depth` steps. Each new token then runs prelude -> up to
`depth` core steps -> coda, one position at a time:

  exit       the token stops its loop once its latent changes little (exit_on "latent":
             ||s_i - s_{i-1}|| / ||s_i|| < exit_threshold) or its next-token distribution does
             (exit_on "kl": KL(p_{i-1} || p_i) < exit_threshold, the coda and head run after every
             step, from step 2 on); per row, rows that exited keep their state while the others go
             on (shapes stay static); 0 never exits early.
  cache      "dense": each core step i has its own cache per core block, and step i of a new
             token attends to the earlier positions' step-i keys/values (positions that exited
             early stand in with their last step's), exact: at a fixed depth without exit the
             logits equal the full forward's. "shared" (the paper's cache sharing): one cache per
             core block holding each earlier position's keys/values of its last step; every step
             of a new token attends to those, so the memory is the non-recurrent model's whatever
             the depth (an approximation the paper reports the model tolerates zero-shot).

The Universal Transformer decodes with one cache per ACT step: ut_generate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from undertow.models.common.decoding import KVCache, generate_tokens
from undertow.models.common.rope import rope_cos_sin

CACHE_MODES = ("dense", "shared")
EXIT_CRITERIA = ("latent", "kl")


@dataclass
class DecodeState:
    prelude: list[KVCache]
    core: list[list[KVCache]]          # dense: [step][block]; shared: [0][block]
    coda: list[KVCache]
    steps_taken: list[float] = field(default_factory=list)  # mean core steps of each decoded token


def _rope(model, positions: torch.Tensor):
    return rope_cos_sin(positions, model.cfg.head_dim, model.cfg.rope_theta)


def _blocks(model):
    P = model.cfg.n_prelude
    return model.layers[:P], model.layers[P], model.layers[P + 1:]


def prefill(model, input_ids: torch.Tensor, depth: int, mode: str):
    """The prompt (B, T) through every block with caches -> last logits (B, V), DecodeState."""
    B, T = input_ids.shape
    cos, sin = _rope(model, torch.arange(T, device=input_ids.device).expand(B, T))
    (x,) = model.embed_stage(input_ids, {})
    prelude_caches, coda_caches, core_caches = [], [], []
    prelude, core, coda = _blocks(model)
    for block in prelude:
        x, cache = block.step(x, cos, sin, None)
        prelude_caches.append(cache)
    s = core.initial_state(x)
    for _ in range(depth):
        s = core.adapter(torch.cat([s, x], dim=-1))
        step_caches = []
        for block in core.blocks:
            s, cache = block.step(s, cos, sin, None)
            step_caches.append(cache)
        core_caches.append(step_caches)
    if mode == "shared":
        core_caches = core_caches[-1:]
    x = core.norm(s)
    for block in coda:
        x, cache = block.step(x, cos, sin, None)
        coda_caches.append(cache)
    return model.head_stage((x[:, -1],)), DecodeState(prelude_caches, core_caches, coda_caches)


def _append(cache: KVCache, entry: KVCache) -> KVCache:
    return KVCache(torch.cat([cache.k, entry.k], dim=1), torch.cat([cache.v, entry.v], dim=1))


def _coda_log_probs(model, coda, core, s, cos, sin, state: DecodeState) -> torch.Tensor:
    """The next-token log-probabilities (B, V) of latent s (B, 1, d), the coda caches left as they are."""
    h = core.norm(s)
    for i, block in enumerate(coda):
        h, _ = block.step(h, cos, sin, state.coda[i])
    return torch.log_softmax(model.head_stage((h[:, 0],)).float(), dim=-1)


def step(model, tokens: torch.Tensor, position: int, state: DecodeState, depth: int, mode: str,
         exit_threshold: float, exit_on: str = "latent") -> torch.Tensor:
    """One token per row (B,) at `position` -> logits (B, V); the caches grow by one position."""
    B = tokens.shape[0]
    cos, sin = _rope(model, torch.full((B, 1), position, device=tokens.device))
    (x,) = model.embed_stage(tokens[:, None], {})
    prelude, core, coda = _blocks(model)
    for i, block in enumerate(prelude):
        x, state.prelude[i] = block.step(x, cos, sin, state.prelude[i])
    s = core.initial_state(x, torch.tensor([position], device=tokens.device))
    done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    taken = torch.zeros(B, device=tokens.device)
    latest: list[KVCache | None] = [None] * len(core.blocks)  # this position's keys/values of its last step
    per_step: list[list[KVCache]] = []
    previous = None  # exit_on "kl": the last step's next-token log-probabilities
    for i in range(depth):
        new = core.adapter(torch.cat([s, x], dim=-1))
        for b, block in enumerate(core.blocks):
            new, cache = block.step(new, cos, sin, state.core[i if mode == "dense" else 0][b])
            k, v = cache.k[:, -1:], cache.v[:, -1:]
            if latest[b] is not None:  # rows that exited keep the keys/values of their last step
                keep = done[:, None, None, None]
                k, v = torch.where(keep, latest[b].k, k), torch.where(keep, latest[b].v, v)
            latest[b] = KVCache(k, v)
        per_step.append(list(latest))
        if exit_on == "kl" and exit_threshold > 0:
            current = _coda_log_probs(model, coda, core, new, cos, sin, state)
            change = (torch.full_like(taken, float("inf")) if previous is None else
                      (previous.exp() * (previous - current)).sum(-1))
            previous = torch.where(done[:, None], previous, current) if previous is not None else current
        else:
            change = (new - s).flatten(1).norm(dim=-1) / new.flatten(1).norm(dim=-1).clamp_min(1e-12)
        taken = taken + (~done).float()
        s = torch.where(done[:, None, None], s, new)
        done = done | (change < exit_threshold)
        if bool(done.all()):
            break
    if mode == "dense":  # steps every row skipped: the last step's keys/values stand in
        for i in range(depth):
            entries = per_step[min(i, len(per_step) - 1)]
            state.core[i] = [_append(c, e) for c, e in zip(state.core[i], entries)]
    else:
        state.core[0] = [_append(c, e) for c, e in zip(state.core[0], latest)]
    state.steps_taken.append(float(taken.mean()))
    x = core.norm(s)
    for i, block in enumerate(coda):
        x, state.coda[i] = block.step(x, cos, sin, state.coda[i])
    return model.head_stage((x[:, 0],))


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, depth: int | None = None,
             cache: str = "dense", exit_threshold: float = 0.0, exit_on: str = "latent", greedy: bool = True,
             stats: dict | None = None) -> torch.Tensor:
    """input_ids (B, T), no padding -> (B, T + max_new_tokens), Huginn at `depth` core steps (default
    the eval depth; any >= 1). `stats`, when given, receives "steps_per_token" (mean core steps of
    each decoded token)."""
    if model.core is None:
        raise ValueError("cached decoding is for arch = 'huginn'; decode the Universal Transformer by full forwards")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache = {cache!r} is unknown; choose one of {CACHE_MODES}")
    depth = depth or model.cfg.test_depth
    if depth < 1:
        raise ValueError(f"depth = {depth} must be >= 1")
    if exit_on not in EXIT_CRITERIA:
        raise ValueError(f"exit_on = {exit_on!r} is unknown; choose one of {EXIT_CRITERIA}")
    if exit_threshold < 0:
        raise ValueError(f"exit_threshold = {exit_threshold} must be >= 0 (0: never exit early)")
    was_training = model.training
    model.eval()
    holder: dict = {}

    def first(ids):
        logits, holder["state"] = prefill(model, ids, depth, cache)
        return logits, holder["state"]

    def next_logits(tokens, position, state):
        return step(model, tokens, position, state, depth, cache, exit_threshold, exit_on)

    try:
        out = generate_tokens(first, next_logits, input_ids, max_new_tokens, greedy)
    finally:
        model.train(was_training)
    if stats is not None and "state" in holder:
        stats["steps_per_token"] = holder["state"].steps_taken
    return out
