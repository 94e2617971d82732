"""The xLSTM paper's sLSTM layer (arXiv 2405.04517, Fig. 9; NX-AI/xlstm `blocks/slstm/layer.py`).

    c         = SiLU(conv(x))                                  (B, T, d) causal, width conv_kernel
    i~, f~    = igate(c), fgate(c)                             block-diagonal per head (H heads of Dh = d / H)
    z~, o~    = zgate(x), ogate(x)                             the un-convolved input: the conv only
                                                               shapes what is written and forgotten
    y         = slstm(i~, f~, z~, o~ + bias, R)                kernels/slstm, R (4, H, Dh, Dh) per head
    out       = GroupNorm(y)                                   per head, (B, T, d); no out projection

The xLSTM code builds the input-gate pre-activation from its module named `fgate` and the forget
gate's from `igate` (`i, f = self.fgate(x_conv), self.igate(x_conv)`): here each module is named
after the gate it feeds, so its `fgate` maps to our `igate` and the reverse. The gate biases live in
the cell there (`_bias`, (H, 4, Dh)), the recurrent matrix as (H, Dh_in, 4, Dh_out).
"""

from __future__ import annotations

import torch
from torch import nn

from undertow.kernels.slstm import slstm
from undertow.models.common.shards import local_shard
from undertow.models.xlstm.config import XLSTMConfig
from undertow.models.xlstm.mlstm_layer import MultiHeadNorm
from undertow.models.xlstm.paper_parts import CausalConv, HeadwiseLinear

# (conv window (B, d, K-1), sLSTM state (y, c, n, m) each (B, H, Dh)), all float32
SLSTMState = tuple[torch.Tensor, tuple[torch.Tensor, ...]]


class SLSTMLayer(nn.Module):
    """forward(x (B, T, d_model), doc_ids (B, T) or None, state, return_state) -> (B, T, d_model)
    [, state]; `step` takes one token (decoding). A document's start resets both the conv window
    and the sLSTM state (each kernel resets where doc_ids changes)."""

    def __init__(self, cfg: XLSTMConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index  # index: the block's depth, for the forget-gate bias init
        d, h = cfg.d_model, cfg.slstm_heads
        dh = d // h
        self.conv = CausalConv(d, cfg.conv_kernel)
        self.igate, self.fgate, self.zgate, self.ogate = (HeadwiseLinear(h, dh, dh) for _ in range(4))
        self.bias = nn.Parameter(torch.empty(4, h, dh))  # (i, f, z, o) per head and channel
        self.R = nn.Parameter(torch.empty(4, h, dh, dh))
        self.norm = MultiHeadNorm(h, dh, cfg.paper_norm_eps)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """The xLSTM code's defaults: gate projections normal(std) (small init), R zero (the cell
        starts without memory mixing), biases zero except the forget gate's "powerlaw_blockdependent"
        profile over each head's channels, from 5 down to -7 (short to long memory; the curve bends
        further toward short memory in deeper blocks)."""
        for gate in (self.igate, self.fgate, self.zgate, self.ogate):
            gate.init_weights(std)
        nn.init.zeros_(self.R)
        nn.init.zeros_(self.bias)
        dh = self.bias.shape[-1]
        depth = self.index / (self.cfg.n_layers - 1) if self.cfg.n_layers > 1 else 0.0
        ramp = torch.arange(dh, dtype=torch.float32, device=self.bias.device) / max(dh - 1, 1)
        self.bias[1] = 5.0 - 12.0 * ramp ** (0.3 + 1.3 * depth)
        self.conv.init_weights()
        self.norm.init_weights()

    def gates(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x, c (conv output) (..., d_model) -> pre-activations W x + b (..., 4, H, Dh) in float32 (the
        kernel's exponential gates are where precision matters)."""
        bias = local_shard(self.bias)  # (4, H, Dh); this rank's heads under tensor parallelism
        raw = torch.stack([self.igate(c), self.fgate(c), self.zgate(x), self.ogate(x)], dim=-2)  # (..., 4, d)
        return raw.unflatten(-1, (-1, bias.shape[-1])).float() + bias.float()

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, state: SLSTMState | None = None,
                return_state: bool = False):
        window, cell = state if state is not None else (None, None)
        c = self.conv(x, doc_ids, window, return_state)
        if return_state:
            c, window = c
        y = slstm(self.gates(x, c), local_shard(self.R), initial_state=cell, doc_ids=doc_ids,
                  return_final_state=return_state)
        if return_state:
            y, cell = y
            return self.norm(y).to(x.dtype), (window, cell)
        return self.norm(y).to(x.dtype)

    def step(self, x: torch.Tensor, state: SLSTMState) -> tuple[torch.Tensor, SLSTMState]:
        """One token per row: x (B, d_model), state -> (B, d_model), the next state (the kernel run
        for one step from the carried state)."""
        window, cell = state
        c, window = self.conv.step(x, window)
        y, cell = slstm(self.gates(x, c)[:, None], local_shard(self.R), initial_state=cell, return_final_state=True)
        return self.norm(y[:, 0]).to(x.dtype), (window, cell)
