"""The parallel "diagonal" sampler for Huginn (after Geiping et al. 2025, arXiv 2510.14961): each
forward pass advances every position that can advance by one core step, so a new draft token is
proposed every pass while earlier positions keep refining, instead of r passes per token.

Exact at a fixed depth r. Position t may take core step i once every earlier position has its
step-(i-1) latent (frontiers never increase along the sequence): step i is then computed on the
same inputs as in the full forward (causal attention reads only earlier positions), so a position
whose r steps are done, after a prefix all done, has the full forward's logits. The token after it
is then final: if the draft proposed earlier differs, it is replaced and everything after it
restarts from s_0. Run to convergence, the text is the sequential greedy sampler's.

One pass = the prelude over the sequence, one core step for each step index some position needs
(batched over those steps), the coda over the sequence: the same parallel depth as one forward of
one core step. Recomputed without caches: the sampler counts passes, its speed comes on a GPU.
"""

from __future__ import annotations

import torch



@torch.no_grad()
def diagonal_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, depth: int | None = None,
                      stats: dict | None = None) -> torch.Tensor:
    """input_ids (1, T) -> (1, T + max_new_tokens) greedy tokens at `depth` core steps per position
    (default the eval depth). `stats` receives "passes" (forward passes, prompt included)."""
    if model.core is None:
        raise ValueError("the diagonal sampler is for arch = 'huginn'")
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"diagonal_generate takes one prompt (1, T >= 1), got shape {tuple(input_ids.shape)}")
    r = depth or model.cfg.test_depth
    was_training = model.training
    model.eval()
    P, d = input_ids.shape[1], model.cfg.d_model
    prelude, core, coda = (model.layers[:model.cfg.n_prelude], model.core,
                           model.layers[model.cfg.n_prelude + 1:])
    seq = input_ids[0].tolist()
    frontier = [0] * P                      # core steps done per position
    latents: list[list[torch.Tensor]] = []  # per position: s_0 .. s_frontier, each (d,)
    passes = 0

    def start(position: int) -> list[torch.Tensor]:
        s0 = core.initial_state(torch.zeros(1, 1, d, device=input_ids.device),
                                torch.tensor([position], device=input_ids.device))
        return [s0[0, 0]]

    latents = [start(t) for t in range(P)]
    try:
        while len(seq) < P + max_new_tokens or min(frontier) < r:
            passes += 1
            L = len(seq)
            ids = torch.tensor([seq], device=input_ids.device)
            ctx = model.layer_context(ids.shape, ids.device)
            (x,) = model.embed_stage(ids, ctx)
            for block in prelude:
                x = block(x, **ctx)
            # positions that advance: every earlier position is at least as far along
            movers, lowest = [], r
            for t in range(L):
                lowest = min(lowest, frontier[t])
                if frontier[t] < r and frontier[t] == lowest:
                    movers.append(t)
            needed = sorted({frontier[t] for t in movers})  # step i + 1 reads the s_i of the whole prefix
            if needed:
                inputs = torch.stack([torch.stack([latents[t][min(i, frontier[t])] for t in range(L)]) for i in needed])
                n = len(needed)
                ctx_n = model.layer_context((n, L), ids.device)
                out = core.step(inputs, x.expand(n, L, d), **ctx_n)
                for t in movers:
                    latents[t].append(out[needed.index(frontier[t]), t])
                    frontier[t] += 1
            current = torch.stack([latents[t][frontier[t]] for t in range(L)])[None]
            h = core.norm(current)
            for block in coda:
                h = block(h, **ctx)
            logits = model.head_stage((h,))[0]
            # commit the token after the finished prefix; propose a draft at the end
            done, grown = 0, False
            while done < L and frontier[done] == r:
                done += 1
            for t in range(max(P - 1, 0), L):
                if t >= done:
                    break
                final = int(logits[t].argmax())
                if t + 1 < L and seq[t + 1] != final:  # a wrong draft: replace it, restart what follows
                    del seq[t + 1:], frontier[t + 1:], latents[t + 1:]
                    L = t + 1
                if t + 1 == L and L < P + max_new_tokens:
                    seq.append(final)
                    frontier.append(0)
                    latents.append(start(L))
                    L, grown = L + 1, True
            if not grown and L == ids.shape[1] and L < P + max_new_tokens:
                seq.append(int(logits[L - 1].argmax()))  # a draft from the newest latent
                frontier.append(0)
                latents.append(start(L))
    finally:
        model.train(was_training)
    if stats is not None:
        stats["passes"] = passes
    return torch.tensor([seq[:P + max_new_tokens]], device=input_ids.device)
