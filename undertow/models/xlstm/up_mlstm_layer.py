"""The xLSTM paper's mLSTM layer with up-projection (arXiv 2405.04517, Fig. 10; NX-AI/xlstm
`blocks/mlstm/layer.py`), the mixer of the `M` blocks. E = up_inner channels, H heads of Dh = E / H:

    a, z      = up_a(x), up_z(x)                              (B, T, E) each, the two branches
    c         = SiLU(conv(a))                                 causal, width conv_kernel
    q, k, v   = q(c), k(c), v(a)                              block-diagonal, blocks of up_qkv_block
    i~, f~    = igate([q, k, v]), fgate([q, k, v])            (B, T, H), Linear with bias, no soft-cap
    h         = mlstm(q, k, v, i~, f~)                        kernels/mlstm (its q / sqrt(Dh) is the
                                                              code's k / sqrt(Dh): the same q.k)
    out       = down((GroupNorm(h) + skip * c) * SiLU(z))     skip: a learnable per-channel weight

The xLSTM code fuses up_a and up_z as proj_up = [a; z]; its gates read q, k, v concatenated in that
order. Its parallel form has no initial state, so its stabilizer differs from the recurrence's
(which starts at m = 0); h does not depend on the stabilizer except through eps * exp(m).

Under tensor parallelism (plan.py) a rank holds whole heads: its channels of a, z, c, q, k, v and
h. The gates read every head's q, k, v: a rank's channels give a partial sum of every head's gate
pre-activation (the weight's columns of its channels), and one reduce-scatter over the heads leaves
each rank the whole sums of its own heads (2 H numbers a token on the wire, not 3 E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from undertow.kernels.mlstm import mlstm, mlstm_step
from undertow.models.common.shards import local_row_parts, local_shard
from undertow.models.xlstm.config import XLSTMConfig
from undertow.models.xlstm.mlstm_layer import MLSTMState, MultiHeadNorm
from undertow.models.xlstm.paper_parts import CausalConv, HeadwiseLinear

# (conv window (B, E, K-1), mLSTM state (C (B, H, Dh, Dh), n (B, H, Dh), m (B, H))), all float32
UpMLSTMState = tuple[torch.Tensor, MLSTMState]


def _sum_onto_heads(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """partial (..., H): this rank's part of a sum over channels, for every head -> (..., H / tp) the
    whole sums of this rank's heads, split as `like` (a head-sharded parameter) is: a reduce-scatter
    (backward: the heads' gradients all-gathered to every rank). `partial` itself without tensor
    parallelism. The mesh is read from `like`, so the model names no process group."""
    if not isinstance(like, DTensor):
        return partial
    parts = [Partial() if isinstance(p, Shard) else Replicate() for p in like.placements]
    heads = [Shard(partial.ndim - 1) if isinstance(p, Shard) else Replicate() for p in like.placements]
    total = DTensor.from_local(partial, like.device_mesh, parts, run_check=False)
    return total.redistribute(placements=heads).to_local()


class UpMLSTMLayer(nn.Module):
    """forward(x (B, T, d_model), doc_ids (B, T) or None, state, return_state) -> (B, T, d_model)
    [, state]; `step` takes one token (decoding). A document's start resets the conv window and the
    mLSTM state (each kernel resets where doc_ids changes)."""

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.cfg = cfg
        d, e, h, blk = cfg.d_model, cfg.up_inner, cfg.up_heads, cfg.up_qkv_block
        self.head_dim = e // h
        self.up_a = nn.Linear(d, e, bias=False)
        self.up_z = nn.Linear(d, e, bias=False)
        self.conv = CausalConv(e, cfg.conv_kernel)
        self.q, self.k, self.v = (HeadwiseLinear(e // blk, blk, blk) for _ in range(3))
        self.igate = nn.Linear(3 * e, h, bias=True)
        self.fgate = nn.Linear(3 * e, h, bias=True)
        self.norm = MultiHeadNorm(h, self.head_dim, cfg.paper_norm_eps)
        self.skip = nn.Parameter(torch.empty(e))
        self.down = nn.Linear(e, d, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """The xLSTM code's: up and q/k/v normal(std) (small init of d_model), gate weights zero,
        forget-gate bias linspace(3, 6) over heads (long memory from the start), input-gate bias
        normal(0, 0.1), skip one, down normal(out_std) (Wang init)."""
        for proj in (self.up_a, self.up_z):
            nn.init.normal_(proj.weight, std=std)
        for proj in (self.q, self.k, self.v):
            proj.init_weights(std)
        for gate in (self.igate, self.fgate):
            nn.init.zeros_(gate.weight)
        nn.init.normal_(self.igate.bias, std=0.1)
        self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.cfg.up_heads))
        nn.init.ones_(self.skip)
        nn.init.normal_(self.down.weight, std=out_std)
        self.conv.init_weights()
        self.norm.init_weights()

    def project(self, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """a, c (..., E) -> q, k, v (..., H, Dh) and i~, f~ (..., H) float32 (this rank's E / tp
        channels and H / tp heads under tensor parallelism)."""
        q, k, v = self.q(c), self.k(c), self.v(a)
        i, f = self.gates(torch.cat([q, k, v], dim=-1))
        heads = (-1, self.head_dim)
        return q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads), i, f

    def gates(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[q, k, v] (..., 3 E) -> i~, f~ (..., H) float32, Linear([q, k, v]) + bias. Under tensor
        parallelism qkv holds this rank's channels of each part, the (replicated) weights are cut to
        the matching columns, and the partial sums are reduce-scattered onto the heads."""
        weight = torch.cat([self.igate.weight, self.fgate.weight])  # (2 H, 3 E)
        columns = local_row_parts(weight.t(), [self.cfg.up_inner] * 3).t()  # this rank's channels of q, k, v
        partial = F.linear(qkv, columns).unflatten(-1, (2, -1))  # (..., 2, H): i and f
        bias = torch.stack([local_shard(self.igate.bias), local_shard(self.fgate.bias)])  # (2, H / tp)
        pre = (_sum_onto_heads(partial, self.igate.bias) + bias).float()
        return pre[..., 0, :], pre[..., 1, :]

    def output(self, h: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """h (..., H, Dh), c and z (..., E) -> (..., d_model)."""
        return self.down((self.norm(h).to(c.dtype) + local_shard(self.skip) * c) * F.silu(z))

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, state: UpMLSTMState | None = None,
                return_state: bool = False):
        window, cell = state if state is not None else (None, None)
        a, z = self.up_a(x), self.up_z(x)
        c = self.conv(a, doc_ids, window, return_state)
        if return_state:
            c, window = c
        h = mlstm(*self.project(a, c), eps=self.cfg.mlstm_eps, chunk_size=self.cfg.chunk_size, initial_state=cell,
                  doc_ids=doc_ids, return_final_state=return_state)
        if return_state:
            h, cell = h
            return self.output(h, c, z), (window, cell)
        return self.output(h, c, z)

    def step(self, x: torch.Tensor, state: UpMLSTMState) -> tuple[torch.Tensor, UpMLSTMState]:
        """One token per row: x (B, d_model), state -> (B, d_model), the next state (the conv's and
        the mLSTM's single-step recurrences)."""
        window, cell = state
        a, z = self.up_a(x), self.up_z(x)
        c, window = self.conv.step(a, window)
        h, cell = mlstm_step(*self.project(a, c), cell, eps=self.cfg.mlstm_eps)
        return self.output(h, c, z), (window, cell)
