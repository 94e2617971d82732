"""The ParaRNN mixer: causal conv, then a ParaGRU or ParaLSTM cell solved in parallel over time.

    v, z = in_proj(x), gate_proj(x)                 (B, T, D) each, D = d_inner
    c    = SiLU(causal_conv1d(v))                   depthwise, width conv_width (kernels/causal_conv1d)
    u    = B c + b                                  (B, T, 3, D): the three gates' pre-activations of
                                                    every channel in one (head-batched) matmul; B is
                                                    block-diagonal over `heads` groups of Dh channels
    h    = pararnn(cell, u, a, p)                   (B, T, D): only the recurrence goes to the kernel
                                                    (kernels/pararnn: Newton, `iterations` steps)
    out  = out_proj(GatedRMSNorm(h, z))             weight * rmsnorm(h * SiLU(z)) per head

B is stored as cell_weight (heads, 3, Dh_out, Dh_in) and b, a (3, D), p (2, D) per channel, so every
parameter of a channel group lies in one slice: tensor parallelism gives each rank whole heads with
all their gates (plan.py) and the rank's channels run through conv, B, the cell and the norm
without communication (the recurrence is diagonal per channel). With heads = 1 (B dense, one norm
group) tensor parallelism splits B by output channel instead: the rank's convolved channels are
all-gathered before B and the norm's mean square is summed over the ranks (dense_split.py).

The Newton solve's final residual, max |h_t - f(h_{t-1}, u_t)|, is recorded every forward as the
metric "pararnn/residual" (models/common/aux.py); the kernel also warns when it stays large.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from undertow.kernels.causal_conv1d import causal_conv1d
from undertow.kernels.pararnn import pararnn
from undertow.models.common.aux import record_metric
from undertow.models.common.decoding import conv_step
from undertow.models.common.gated_norm import GatedRMSNorm
from undertow.models.common.shards import local_shard
from undertow.models.pararnn.config import ParaRNNConfig
from undertow.models.pararnn.dense_split import gather_channels, sum_over_shards

# (conv window (B, D, K-1), cell state: GRU h (B, D) or LSTM (c, h) each (B, D)), float32
ParaRNNState = tuple[torch.Tensor, object]


class ParaRNNMixer(nn.Module):
    """forward(x (B, T, d_model), doc_ids (B, T) or None, state=None, return_state=False) ->
    (B, T, d_model) [, state]; `step(x (B, d_model), state)` decodes one token. A document's start
    resets the conv window and the cell state (both kernels reset where doc_ids changes)."""

    def __init__(self, cfg: ParaRNNConfig, cell: str):
        super().__init__()
        self.cfg, self.cell = cfg, cell
        d, D, H, Dh = cfg.d_model, cfg.d_inner, cfg.heads, cfg.head_dim
        self.in_proj = nn.Linear(d, D, bias=False)
        self.gate_proj = nn.Linear(d, D, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(D, cfg.conv_width))
        self.conv_bias = nn.Parameter(torch.empty(D)) if cfg.conv_bias else None
        self.cell_weight = nn.Parameter(torch.empty(H, 3, Dh, Dh))  # (head, gate, out channel, in channel)
        self.cell_bias = nn.Parameter(torch.empty(3, D))
        self.a = nn.Parameter(torch.empty(3, D))  # diagonal recurrent weights (GRU: z, r, h; LSTM: f, c, o)
        self.p = nn.Parameter(torch.empty(2, D)) if cell == "lstm" else None  # peepholes (p_f, p_o)
        self.norm = GatedRMSNorm(D, Dh, cfg.norm_eps)
        self.out_proj = nn.Linear(D, d, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Projections normal(std), out_proj normal(out_std); the conv as PyTorch's depthwise Conv1d
        (U(+-1/sqrt(K))); B normal(1/sqrt(Dh)), the unit-gain variance of the ParaRNN code's
        kaiming-uniform; biases zero (its training configs' constant_zero); a and p truncated
        normal(1/sqrt(D)) within +-0.9 (its xavier_gaussian for A): weak recurrences, for which 3
        Newton steps converge (kernels/pararnn/newton.py)."""
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        bound = 1.0 / math.sqrt(self.cfg.conv_width)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        if self.conv_bias is not None:
            nn.init.uniform_(self.conv_bias, -bound, bound)
        nn.init.normal_(self.cell_weight, std=1.0 / math.sqrt(self.cfg.head_dim))
        nn.init.zeros_(self.cell_bias)
        recurrent_std = 1.0 / math.sqrt(self.cfg.d_inner)
        for w in (self.a, self.p):
            if w is not None:
                nn.init.trunc_normal_(w, std=recurrent_std, a=-0.9, b=0.9)
        self.norm.init_weights()

    def gate_inputs(self, c: torch.Tensor) -> torch.Tensor:
        """Convolved channels c (..., D) -> u = B c + b (..., 3, D), this rank's heads under TP."""
        weight = local_shard(self.cell_weight)  # (h, 3, Dh, Dh); heads = 1 under TP: (1, 3, D / tp, D)
        if weight.shape[0] * weight.shape[-1] != c.shape[-1]:  # dense B split by output channel
            c = gather_channels(c, self.cell_weight)
        heads = c.unflatten(-1, (weight.shape[0], weight.shape[-1]))  # (..., h, Dh)
        u = torch.einsum("...hi,hgoi->...gho", heads, weight).flatten(-2)
        return u + local_shard(self.cell_bias).to(u.dtype)

    def gated_norm(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """GatedRMSNorm(h, z), h and z (..., D) this rank's channels. Where its group is wider than
        the rank's channels (heads = 1 under TP) the float32 mean square is summed over the ranks."""
        norm = self.norm
        if h.shape[-1] % norm.group_size == 0:
            return norm(h, z)
        g = h.float() * nn.functional.silu(z.float())
        mean_square = sum_over_shards(g.pow(2).sum(-1, keepdim=True), norm.weight) / norm.group_size
        return (g * torch.rsqrt(mean_square + norm.eps) * local_shard(norm.weight).float()).to(z.dtype)

    def recurrence(self, u: torch.Tensor, doc_ids=None, initial_state=None, backend: str | None = None):
        """u (B, T, 3, D) -> h (B, T, D), the cell state after the last token, the Newton residual."""
        return pararnn(self.cell, u, local_shard(self.a), local_shard(self.p), iterations=self.cfg.iterations,
                       tol=self.cfg.tol, chunk_size=self.cfg.chunk_size, initial_state=initial_state,
                       doc_ids=doc_ids, return_final_state=True, return_residual=True, backend=backend)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, state: ParaRNNState | None = None,
                return_state: bool = False):
        window, cell_state = state if state is not None else (None, None)
        v, z = self.in_proj(x), self.gate_proj(x)
        c, window = causal_conv1d(v, local_shard(self.conv_weight), local_shard(self.conv_bias), activation="silu",
                                  initial_state=window, doc_ids=doc_ids, return_final_state=True)
        h, cell_state, residual = self.recurrence(self.gate_inputs(c), doc_ids, cell_state)
        record_metric("pararnn/residual", residual)
        out = self.out_proj(self.gated_norm(h.to(z.dtype), z))
        return (out, (window, cell_state)) if return_state else out

    def step(self, x: torch.Tensor, state: ParaRNNState) -> tuple[torch.Tensor, ParaRNNState]:
        """One token per row: x (B, d_model), state -> (B, d_model), the next state. The conv step and
        one step of the cell itself (the kernel's sequential reference for a single token)."""
        window, cell_state = state
        z = self.gate_proj(x)
        c, window = conv_step(window, self.in_proj(x), self.conv_weight, self.conv_bias)
        h, cell_state, _ = self.recurrence(self.gate_inputs(c)[:, None], None, cell_state, backend="reference")
        return self.out_proj(self.gated_norm(h[:, 0].to(z.dtype), z)), (window, cell_state)
