"""MoE routers behind one interface: router(x, state, gru) -> (logits (N, E) float32, new state).

    linear  logits = W x                                   (Mixtral, OLMoE); no state
    rmoe    x' = W1_l x (d -> r);  h_l = GRU(x', h_(l-1));  logits = W2_l h_l   (RMoE, Qiu et al. 2025)

RMoE's GRU runs over the layers, not over the sequence: h is per token, (N, r), starts at 0 before
the first MoE layer (the model's embed step) and is carried from layer to layer with the
activations, so each layer's routing sees the routing of the layers below. One GRU cell
(`RouterGRU`, owned by the model) serves every layer; W1_l and W2_l are the layer's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from undertow.models.moe.config import MoEConfig


def local(t: torch.Tensor) -> torch.Tensor:
    """A weight as a plain tensor: under tensor parallelism the MoE weights are replicated DTensors
    and every rank computes the whole MoE layer with them, so the gradient each rank gets is the
    whole (Replicate) gradient. (common/shards.py's local_shard marks it Partial instead, for
    mixers whose ranks each compute a part: summed over ranks, it would count this one tp times.)"""
    return t.to_local() if hasattr(t, "to_local") else t


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, local(layer.weight), None if layer.bias is None else local(layer.bias))


class RouterGRU(nn.Module):
    """The GRU cell shared by all RMoE layers. x', h: (N, r) -> h' (N, r). Its weights are torch's
    GRUCell's (gates r, z, n stacked in weight_ih / weight_hh (3r, r) and their biases):
        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h"""

    def __init__(self, dim: int):
        super().__init__()
        self.cell = nn.GRUCell(dim, dim)

    def init_weights(self) -> None:
        bound = 1.0 / math.sqrt(self.cell.hidden_size)
        for p in self.cell.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        c = self.cell
        h = h.to(x.dtype)
        xr, xz, xn = F.linear(x, local(c.weight_ih), local(c.bias_ih)).chunk(3, -1)
        hr, hz, hn = F.linear(h, local(c.weight_hh), local(c.bias_hh)).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class LinearRouter(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.gate = nn.Linear(d_model, cfg.n_experts, bias=False)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.gate.weight, std=std)

    def forward(self, x: torch.Tensor, state=None, gru=None) -> tuple[torch.Tensor, None]:
        return linear(x, self.gate).float(), None


class RecurrentRouter(nn.Module):
    """The layer's part of RMoE: W1 (proj_in) and W2 (proj_out) around the shared GRU."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.proj_in = nn.Linear(d_model, cfg.router_dim, bias=False)
        self.proj_out = nn.Linear(cfg.router_dim, cfg.n_experts, bias=False)

    def init_weights(self, std: float) -> None:
        """W1 as the model's input projections; W2 normal(1 / sqrt(r)) over the GRU's (-1, 1) state
        (the model's std there started tiny-rmoe worse: validation 4.60 against 4.46 at 300 steps)."""
        nn.init.normal_(self.proj_in.weight, std=std)
        nn.init.normal_(self.proj_out.weight, std=1.0 / math.sqrt(self.proj_out.in_features))

    def forward(self, x: torch.Tensor, state: torch.Tensor, gru: RouterGRU) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d), state h_(l-1) (N, r) -> logits (N, E) float32, h_l (N, r)."""
        if state is None or gru is None:
            raise ValueError("the rmoe router needs the carried router state and the model's shared GRU")
        h = gru(linear(x, self.proj_in), state)
        return linear(h, self.proj_out).float(), h


def build_router(d_model: int, cfg: MoEConfig) -> nn.Module:
    return RecurrentRouter(d_model, cfg) if cfg.router == "rmoe" else LinearRouter(d_model, cfg)
