"""Incremental decoding for MambaLM: prefill once, then one token at a time with carried state.

Prefill runs the prompt through each mixer's full forward (the kernels' `return_final_state`
seeds the per-layer states). Each later token takes a single-token step per layer:
  m, M  the recurrence itself: conv window (last d_conv - 1 inputs) and SSM state, float32
  *     a key/value cache (keys after RoPE, when used) that grows by one position per token
  -     stateless
The steps restate the kernels' recurrences (see kernels/*/reference.py) for one time step, so the
tests comparing them with the full forward also check that the two agree.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from undertow.models.common.decoding import attention_with_cache, conv_step, generate_tokens, prompt_rope, token_rope
from undertow.models.mamba.mamba1 import Mamba1Mixer
from undertow.models.mamba.mamba2 import Mamba2Mixer


def mamba1_step(mixer: Mamba1Mixer, u: torch.Tensor, state):
    """u: (B, d_model) -> (B, d_model), next state. state = (window (B, d_inner, K-1), h (B, d_inner, N))."""
    window, h = state
    x, window = conv_step(window, mixer.in_proj_x(u), mixer.conv_weight, mixer.conv_bias)
    dt, B, C = mixer.ssm_inputs(x)  # (B, d_inner), (B, N), (B, N)
    dt = F.softplus(dt.float() + mixer.dt_proj.bias.float())
    A = -torch.exp(mixer.A_log.float())
    x32 = x.float()
    h = torch.exp(dt[..., None] * A) * h + (dt * x32)[..., None] * B.float()[:, None, :]
    y = (h * C.float()[:, None, :]).sum(-1) + mixer.D.float() * x32
    y = y * F.silu(mixer.in_proj_z(u).float())
    return mixer.out_proj(y.to(u.dtype)), (window, h)


def mamba2_step(mixer: Mamba2Mixer, u: torch.Tensor, state):
    """u: (B, d_model) -> (B, d_model), next state. state = (window (B, d_inner + 2GN, K-1), S (B, H, P, N))."""
    window, S = state
    xbc, window = conv_step(window, mixer.conv_input(u), mixer.conv_weight, mixer.conv_bias)
    x, B, C = mixer.split_conv_output(xbc)  # (B, H, P), (B, G, N), (B, G, N)
    heads_per_group = x.shape[1] // B.shape[1]
    B, C = (t.float().repeat_interleave(heads_per_group, dim=1) for t in (B, C))  # (B, H, N)
    dt = F.softplus(mixer.in_proj_dt(u).float() + mixer.dt_bias.float())  # (B, H)
    A = -torch.exp(mixer.A_log.float())
    x32 = x.float()
    S = torch.exp(dt * A)[..., None, None] * S + (dt[..., None] * x32)[..., None] * B[:, :, None, :]
    y = (S * C[:, :, None, :]).sum(-1) + mixer.D.float()[:, None] * x32  # (B, H, P)
    out = mixer.out_proj(mixer.norm(y.flatten(-2).to(u.dtype), mixer.in_proj_z(u)))
    return out, (window, S)


def prefill(model, input_ids: torch.Tensor):
    """Full forward over the prompt (B, T) -> last-position logits (B, V), per-layer states."""
    B, T = input_ids.shape
    cos, sin = prompt_rope(model.rope, input_ids)
    x = model.embed_tokens(input_ids)
    router = model.add_router_state(x, input_ids)[1:]  # the rmoe router's h_0 (B, T, r), or nothing
    states = []
    for layer in model.layers:
        if layer.is_moe:  # per token; carries nothing across positions (the router state runs over layers)
            x, *router = model.call_layer(layer, (x, *router))
            states.append(None)
            continue
        h = layer.mixer_input(x)
        if layer.kind in "mM":
            out, state = layer.mixer(h, return_state=True)
        elif layer.kind == "*":
            out, state = attention_with_cache(layer.mixer, h, cos, sin, None)
        else:
            out, state = layer.mixer(h), None
        x = x + out.to(x.dtype)
        states.append(state)
    return model.logits(x[:, -1]), states


def step(model, tokens: torch.Tensor, position: int, states: list):
    """One new token per row, tokens (B,) at `position` -> logits (B, V); updates `states` in place."""
    cos, sin = token_rope(model.rope, tokens, position)
    x = model.embed_tokens(tokens)
    router = model.add_router_state(x, tokens)[1:]
    for i, layer in enumerate(model.layers):
        if layer.is_moe:
            x, *router = model.call_layer(layer, (x, *router))
            continue
        h = layer.mixer_input(x)
        if layer.kind == "m":
            out, states[i] = mamba1_step(layer.mixer, h, states[i])
        elif layer.kind == "M":
            out, states[i] = mamba2_step(layer.mixer, h, states[i])
        elif layer.kind == "*":
            out, states[i] = attention_with_cache(layer.mixer, h[:, None], cos, sin, states[i])
            out = out[:, 0]
        else:
            out = layer.mixer(h)
        x = x + out.to(x.dtype)
    return model.logits(x)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True) -> torch.Tensor:
    """input_ids (B, T), one prompt per row, no padding -> (B, T + max_new_tokens); the token loop
    is models/common/decoding.py's. greedy: argmax; otherwise samples from softmax(logits)."""
    return generate_tokens(functools.partial(prefill, model), functools.partial(step, model), input_ids,
                           max_new_tokens, greedy)
