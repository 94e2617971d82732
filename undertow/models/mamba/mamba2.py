"""The Mamba-2 mixer (SSD: scalar decay per head, B and C shared by groups of heads).

    z, x, B, C, dt = in_proj_z(u), in_proj_x(u), in_proj_B(u), in_proj_C(u), in_proj_dt(u)
    x|B|C  = silu(causal_conv1d(x|B|C))          one depthwise conv over the concatenated channels
    y      = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias)      per head h of size headdim
    out    = out_proj(norm(y, z))                 norm = weight * rmsnorm(y * silu(z)) per group

The input projections are separate modules (not one fused in_proj) so a tensor-parallel plan can
shard z/x/dt by head and B/C by group; a fused layout for export lives in the HF adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from undertow.kernels.causal_conv1d import causal_conv1d
from undertow.kernels.ssd import ssd
from undertow.models.common.gated_norm import GatedRMSNorm
from undertow.models.common.shards import local_row_parts, local_shard
from undertow.models.mamba.config import MambaConfig
from undertow.models.mamba.mamba1 import init_conv, init_dt_bias


class Mamba2Mixer(nn.Module):
    """SSD mixer. forward(u (B, T, d_model)) -> (B, T, d_model).

    state (for generation): (conv window (B, d_inner + 2 * ngroups * d_state, d_conv - 1),
    SSM state (B, nheads, headdim, d_state)), float32.
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d, di, gn, h = cfg.d_model, cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.nheads
        self.in_proj_z = nn.Linear(d, di, bias=cfg.proj_bias)
        self.in_proj_x = nn.Linear(d, di, bias=cfg.proj_bias)
        self.in_proj_B = nn.Linear(d, gn, bias=cfg.proj_bias)
        self.in_proj_C = nn.Linear(d, gn, bias=cfg.proj_bias)
        self.in_proj_dt = nn.Linear(d, h, bias=cfg.proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(di + 2 * gn, cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(di + 2 * gn)) if cfg.conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = GatedRMSNorm(di, di // cfg.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(di, d, bias=cfg.proj_bias)

    def init_weights(self, std: float, out_std: float) -> None:
        projections = (self.in_proj_z, self.in_proj_x, self.in_proj_B, self.in_proj_C, self.in_proj_dt)
        for proj, s in [(p, std) for p in projections] + [(self.out_proj, out_std)]:
            nn.init.normal_(proj.weight, std=s)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        init_conv(self.conv_weight, self.conv_bias)
        init_dt_bias(self.dt_bias, self.cfg)
        # A uniform in [1, 16] per head (Mamba-2's initialization).
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1.0, 16.0)))
        nn.init.ones_(self.D)
        self.norm.init_weights()

    def conv_parts(self) -> list[int]:
        """Widths of the conv's channel parts x | B | C (all ranks together)."""
        gn = self.cfg.ngroups * self.cfg.d_state
        return [self.cfg.d_inner, gn, gn]

    def split_conv_output(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d_inner + 2 G N) -> x (B, T, H, P), B (B, T, G, N), C (B, T, G, N).

        Under tensor parallelism xbc holds this rank's share of each part (H / tp heads, G / tp groups).
        """
        cfg = self.cfg
        shards = sum(self.conv_parts()) // xbc.shape[-1]
        x, B, C = xbc.split([width // shards for width in self.conv_parts()], dim=-1)
        return (
            x.unflatten(-1, (-1, cfg.headdim)),
            B.unflatten(-1, (-1, cfg.d_state)),
            C.unflatten(-1, (-1, cfg.d_state)),
        )

    def conv_input(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, T, d_model) -> the conv's input channels x | B | C, (B, T, d_inner + 2 G N)."""
        return torch.cat([self.in_proj_x(u), self.in_proj_B(u), self.in_proj_C(u)], dim=-1)

    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B, T, d_model) -> z (B, T, d_inner), x|B|C (B, T, d_inner + 2 G N), dt (B, T, nheads).

        One matmul over the five projections' weights concatenated at run time (a third fewer
        matmul calls per step); the modules stay separate for tensor-parallel plans and checkpoints.
        Under tensor parallelism the weights are this rank's shards (its heads and groups), so the
        outputs are its channels, x|B|C in the layout of `local_row_parts(conv_weight)`.
        """
        projs = (self.in_proj_z, self.in_proj_x, self.in_proj_B, self.in_proj_C, self.in_proj_dt)
        weights = [local_shard(p.weight) for p in projs]
        bias = torch.cat([local_shard(p.bias) for p in projs]) if self.cfg.proj_bias else None
        nz, nx, nb, nc, ndt = (w.shape[0] for w in weights)
        z, xbc, dt = F.linear(local_shard(u), torch.cat(weights), bias).split([nz, nx + nb + nc, ndt], dim=-1)
        return z, xbc, dt

    def forward(self, u: torch.Tensor, doc_ids: torch.Tensor | None = None, return_state: bool = False):
        """u: (B, T, d_model); doc_ids: (B, T) resets the conv window and SSM state where it changes.
        Returns (B, T, d_model) [, state after the last token]."""
        z, xbc_in, dt = self.project(u)
        parts = self.conv_parts()
        xbc, conv_state = causal_conv1d(
            xbc_in, local_row_parts(self.conv_weight, parts), local_row_parts(self.conv_bias, parts),
            activation="silu", doc_ids=doc_ids, return_final_state=True,
        )
        x, B, C = self.split_conv_output(xbc)
        A = -torch.exp(local_shard(self.A_log).float())
        y, ssm_state = ssd(
            x, dt, A, B, C, D=local_shard(self.D), dt_bias=local_shard(self.dt_bias), chunk_size=self.cfg.chunk_size,
            doc_ids=doc_ids, return_final_state=True,
        )
        out = self.out_proj(self.norm(y.flatten(-2), z))
        return (out, (conv_state, ssm_state)) if return_state else out
