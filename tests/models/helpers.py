"""Shared by the model tests: a model built the way the trainer builds it, and greedy decoding
spelled the slow way (the oracle of every family's `generate`)."""

import torch

from undertow.models import registry


def build(cfg, seed: int = 0, perturb: float = 0.0):
    """Built on the meta device, materialized, initialized; `perturb` adds noise so that zero-initialized
    gates (or a zero recurrent matrix) and equal heads do not hide mistakes."""
    with torch.device("meta"):
        model = registry.build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return model


@torch.no_grad()
def greedy_by_full_forwards(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompt (B, T) + `new_tokens` argmax tokens, each from a full forward over everything so far."""
    out = prompt
    for _ in range(new_tokens):
        out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out
