"""Pieces the xLSTM paper's blocks (`s`, `M`) share: block-diagonal projections, the pre-norm, the
causal conv that carries its window, and the gated GeLU FFN.

Parameter layouts are the xLSTM code's (NX-AI/xlstm 2.0.6, `components/`), so its weights map one
to one: a block-diagonal projection's weight is (blocks, out per block, in per block); the conv's is
(channels, width) (nn.Conv1d's (channels, 1, width) without the middle axis). Its LayerNorms store
weight - 1 (`residual_weight`); ours store the weight itself.

Under tensor parallelism (plan.py) the block-diagonal weights are sharded by block and the conv by
channel; both compute with this rank's shard (`local_shard`) on this rank's channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from undertow.kernels.causal_conv1d import causal_conv1d
from undertow.models.common.decoding import conv_step
from undertow.models.common.mlp import SwiGLU
from undertow.models.common.norms import RMSNorm
from undertow.models.common.shards import local_shard
from undertow.models.xlstm.config import XLSTMConfig


class HeadwiseLinear(nn.Module):
    """Block-diagonal projection without bias: the input's `blocks` groups of `d_in` channels each
    project to `d_out` channels of their own group. x (..., blocks * d_in) -> (..., blocks * d_out)."""

    def __init__(self, blocks: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(blocks, d_out, d_in))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = local_shard(self.weight)  # this rank's blocks under tensor parallelism
        blocks = x.unflatten(-1, (weight.shape[0], -1))
        return torch.einsum("...hi,hoi->...ho", blocks, weight).flatten(-2)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with a weight and no bias (the paper's), computed in float32.
    x (..., dim) -> (..., dim) in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), None, self.eps).to(x.dtype)


def pre_norm(cfg: XLSTMConfig) -> nn.Module:
    """The norm in front of an s/M block's branches: the paper's LayerNorm, or RMSNorm (cfg.paper_norm)."""
    cls = LayerNorm if cfg.paper_norm == "layernorm" else RMSNorm
    return cls(cfg.d_model, cfg.paper_norm_eps)


class CausalConv(nn.Module):
    """Depthwise causal conv + SiLU over `channels`, width `kernel` (kernels/causal_conv1d).

    forward(x (B, T, D), doc_ids, window, return_state) -> y (B, T, D) [, window (B, D, K-1) float32]:
    a document's first tokens see zeros before them, as the row's first tokens do without `window`.
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.empty(channels))

    def init_weights(self) -> None:
        """nn.Conv1d's default (the xLSTM code keeps it): uniform(+-1/sqrt(fan_in)), fan_in = width."""
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x, doc_ids=None, window=None, return_state=False):
        return causal_conv1d(x, local_shard(self.weight), local_shard(self.bias), activation="silu",
                             initial_state=window, doc_ids=doc_ids, return_final_state=return_state)

    def step(self, x: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token x (B, D) after the inputs `window` holds -> y (B, D), the next window."""
        return conv_step(window, x, self.weight, self.bias)


class GatedGeluFFN(SwiGLU):
    """The sLSTM block's FFN (xLSTM `GatedFeedForward`): down(gelu(gate x) * up x), exact GeLU.
    x (..., d_model) -> (..., d_model). The xLSTM code's proj_up is [gate; up] stacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))
