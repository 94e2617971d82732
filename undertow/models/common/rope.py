"""Rotary position embeddings (the rotate-half layout used by Llama and Hugging Face)."""

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: (B, T) -> cos, sin: (B, T, head_dim), float32.

    Computed from the positions themselves (no cache), so packed rows whose positions restart
    at each document get the right angles.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (B, T, D) -> (B, T, H, D) rotated, in x's dtype."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.to(x.dtype)
