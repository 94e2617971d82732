"""The Mamba-1 mixer (selective SSM), with Falcon-Mamba's optional dt/B/C normalization.

    x, z   = in_proj_x(u), in_proj_z(u)                      (B, T, d_inner) each
    x      = silu(causal_conv1d(x))                          depthwise, width d_conv
    dt|B|C = x_proj(x);  dt = dt_proj(dt) (bias added inside the scan, before softplus)
    y      = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)   (gated by silu(z))
    out    = out_proj(y)

Also holds the initializations both Mamba mixers share (dt bias, convolution).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from undertow.kernels.causal_conv1d import causal_conv1d
from undertow.kernels.selective_scan import selective_scan
from undertow.models.common.gated_norm import rms_normalize
from undertow.models.common.shards import local_shard
from undertow.models.mamba.config import MambaConfig


def init_dt_bias(bias: torch.Tensor, cfg: MambaConfig) -> None:
    """bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored at dt_init_floor,
    so that softplus(bias) starts at dt (Mamba's initialization)."""
    log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dt = torch.exp(torch.rand_like(bias, dtype=torch.float32) * (log_hi - log_lo) + log_lo)
    dt = dt.clamp(min=cfg.dt_init_floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


def init_conv(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """PyTorch's default for a depthwise Conv1d (fan_in = width): U(-1/sqrt(K), 1/sqrt(K))."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class Mamba1Mixer(nn.Module):
    """Selective SSM mixer. forward(u (B, T, d_model)) -> (B, T, d_model).

    state (for generation): (conv window (B, d_inner, d_conv - 1), SSM state (B, d_inner, d_state)), float32.
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d, di, n, r = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank
        self.in_proj_x = nn.Linear(d, di, bias=cfg.proj_bias)
        self.in_proj_z = nn.Linear(d, di, bias=cfg.proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(di, cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(di)) if cfg.conv_bias else None
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, n))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, d, bias=cfg.proj_bias)

    def init_weights(self, std: float, out_std: float) -> None:
        cfg = self.cfg
        for proj, s in ((self.in_proj_x, std), (self.in_proj_z, std), (self.x_proj, std), (self.out_proj, out_std)):
            nn.init.normal_(proj.weight, std=s)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        init_conv(self.conv_weight, self.conv_bias)
        bound = cfg.rank**-0.5  # keeps dt_proj's output variance independent of the rank
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        init_dt_bias(self.dt_proj.bias, cfg)
        # A = -(1, 2, ..., d_state) in every channel (S4D-real), built from A_log itself so that a
        # tensor-parallel shard (a DTensor) initializes in place too.
        self.A_log.copy_(torch.ones_like(self.A_log).cumsum(-1).log())
        nn.init.ones_(self.D)

    def ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolved x (B, T, d_inner) -> dt before bias and softplus (B, T, d_inner), B, C (B, T, d_state)."""
        r, n = self.cfg.rank, self.cfg.d_state
        dt, B, C = self.x_proj(x).split([r, n, n], dim=-1)
        if self.cfg.falcon_norm:
            dt, B, C = (rms_normalize(t, self.cfg.mixer_norm_eps) for t in (dt, B, C))
        return nn.functional.linear(dt, local_shard(self.dt_proj.weight)), B, C

    def forward(self, u: torch.Tensor, doc_ids: torch.Tensor | None = None, return_state: bool = False):
        """u: (B, T, d_model); doc_ids: (B, T) resets the conv window and SSM state where it changes.
        Returns (B, T, d_model) [, state after the last token]."""
        x, z = self.in_proj_x(u), self.in_proj_z(u)
        x, conv_state = causal_conv1d(
            x, local_shard(self.conv_weight), local_shard(self.conv_bias), activation="silu", doc_ids=doc_ids,
            return_final_state=True,
        )
        dt, B, C = self.ssm_inputs(x)
        A = -torch.exp(local_shard(self.A_log).float())
        y, ssm_state = selective_scan(
            x, dt, A, B, C, local_shard(self.D), z, local_shard(self.dt_proj.bias), True, doc_ids=doc_ids,
            return_final_state=True,
        )
        out = self.out_proj(y)
        return (out, (conv_state, ssm_state)) if return_state else out
