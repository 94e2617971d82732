"""Huginn's training depth: r ~ Poisson(lambda) + 1 with lambda ~ LogNormal(log(mean) - sigma^2/2,
sigma) (so E[lambda] = mean_depth), clamped to max_depth; the last k = min(backprop_depth, r)
steps take gradients, the first r - k run under no_grad.

The draw is a function of (depth_seed, training step) only, from its own generator: every rank
(data, tensor, context, pipeline) draws the same depth without communicating, a resumed run draws
what the interrupted one would have, and activation checkpointing's recomputation sees the same r.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from undertow.models.depth.config import DepthConfig


class DepthDraw(NamedTuple):
    no_grad: int
    grad: int


def draw_depth(cfg: DepthConfig, step: int) -> DepthDraw:
    """The depth of training step `step` split into (steps without, steps with gradient)."""
    if cfg.depth_distribution == "fixed":
        r = max(1, round(cfg.mean_depth))
    else:
        g = torch.Generator().manual_seed(cfg.depth_seed * 1_000_003 + step)
        mu = math.log(cfg.mean_depth) - cfg.depth_sigma ** 2 / 2
        rate = torch.exp(mu + cfg.depth_sigma * torch.randn((), generator=g, dtype=torch.float64, device="cpu"))
        r = int(torch.poisson(rate.reshape(1), generator=g)) + 1
    r = min(r, cfg.max_depth)
    k = min(cfg.backprop_depth, r)
    return DepthDraw(r - k, k)
