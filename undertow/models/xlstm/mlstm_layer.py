"""The mLSTM layer of xLSTM-7B and its per-head norm.

    q, k, v = q(x), k(x), v(x)                          (B, T, H, Dqk), (B, T, H, Dqk), (B, T, H, Dv)
    i~, f~  = cap * tanh(igate(x) / cap), same for f    (B, T, H), gate projections with bias
    h       = mlstm(q, k, v, i~, f~)                    kernels/mlstm: matrix memory per head
    out     = out_proj(sigmoid(ogate(x)) * MultiHeadNorm(h))

Every projection is its own Linear (q, k, v, the three gates), so a tensor-parallel plan shards
them by head (plan.py); shapes are read from the projections' outputs, so a rank's shard runs
its own heads. Where the weights are whole plain tensors they are applied as one stacked matmul
(`stacked_projections`). Only the gates that choose what is remembered have biases (xLSTM-7B's use_bias is
off for everything else).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from undertow.kernels.mlstm import mlstm, mlstm_step
from undertow.kernels.multihead_norm import multihead_norm
from undertow.models.common.shards import local_shard
from undertow.models.xlstm.config import XLSTMConfig

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C (B, H, Dqk, Dv), n (B, H, Dqk), m (B, H)


class _SoftCap(torch.autograd.Function):
    """y = cap * tanh(x / cap), dy/dx = 1 - (y / cap)^2. Autograd through the three ops allocates a
    tensor per op each way and keeps x / cap and the tanh; this keeps only y and allocates one tensor
    forward and one backward. On the (B, T, vocab) float32 logits that is most of the soft-cap's cost
    in a CPU training step (fresh large tensors cost page faults as well as passes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cap: float) -> torch.Tensor:
        y = torch.div(x, cap).tanh_().mul_(cap)  # the same ops, in place after the first
        ctx.cap = cap
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return y.mul(-1.0 / ctx.cap ** 2).mul_(y).add_(1.0).mul_(grad), None


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): x bounded to (-cap, cap), nearly unchanged where |x| << cap (0: no cap)."""
    return _SoftCap.apply(x, cap) if cap else x


def _whole(w: torch.Tensor | None) -> bool:
    """A plain tensor holding all of its values here: not a DTensor shard (tensor parallelism), not
    a DeepSpeed ZeRO-3 parameter (gathered only by its own module's forward hook)."""
    return w is None or (type(w) in (torch.Tensor, nn.Parameter) and not hasattr(w, "ds_id"))


def stacked_projections(x: torch.Tensor, mods: tuple[nn.Linear, ...]) -> list[torch.Tensor] | None:
    """[m(x) for m in mods] as one matmul with the weights stacked (biases added after), or None where
    a weight is not whole (`_whole`) or a module has forward hooks. One (tokens, sum of widths)
    product instead of six small ones, and in the backward one input gradient instead of six and
    their five sums: a quarter of the layer's projection time on CPU at tiny-xlstm's shape."""
    if any(m._forward_hooks or m._forward_pre_hooks or not (_whole(m.weight) and _whole(m.bias)) for m in mods):
        return None
    out = F.linear(x, torch.cat([m.weight for m in mods]))
    parts = list(out.split([m.out_features for m in mods], -1))
    return [p if m.bias is None else p + m.bias for p, m in zip(parts, mods)]


class MultiHeadNorm(nn.Module):
    """LayerNorm over each head's channels (mean removed, no bias), then a per-channel weight.

    h: (B, T, H, Dv) -> (B, T, H * Dv) in h's dtype, computed in float32. Under tensor parallelism
    the weight is sharded by head like h, so each rank normalizes its own heads locally.
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, h: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """With `gate` (B, T, H * Dv): sigmoid(gate) * the norm, in gate's dtype (one native pass each
        way on CPU float32, kernels/multihead_norm)."""
        return multihead_norm(h, local_shard(self.weight), self.eps, gate)


class MLSTMLayer(nn.Module):
    """forward(x (B, T, d_model), doc_ids (B, T) or None) -> (B, T, d_model).

    With `state` (the float32 (C, n, m) of the tokens before x) the recurrence continues from it;
    `return_state` also returns the state after the last token; `step` takes one token (decoding,
    generate.py).
    """

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.d_model, cfg.n_heads
        self.q = nn.Linear(d, cfg.qk_dim, bias=False)
        self.k = nn.Linear(d, cfg.qk_dim, bias=False)
        self.v = nn.Linear(d, cfg.v_dim, bias=False)
        self.igate = nn.Linear(d, h, bias=True)
        self.fgate = nn.Linear(d, h, bias=True)
        self.ogate = nn.Linear(d, cfg.v_dim, bias=False)
        self.norm = MultiHeadNorm(h, cfg.v_head_dim, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.v_dim, d, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        """xLSTM-7B's: q, k, v normal(std); gate weights zero, so every gate starts from its bias:
        the input gate at -10 (writes start tiny), the forget gate at linspace(3, 6) over heads
        (sigmoid 0.95 .. 0.998: each head keeps memory over a different time scale); the output
        gate at sigmoid(0) = 1/2; out_proj normal(out_std)."""
        cfg = self.cfg
        for proj in (self.q, self.k, self.v):
            nn.init.normal_(proj.weight, std=std)
        for gate in (self.igate, self.fgate, self.ogate):
            nn.init.zeros_(gate.weight)
        nn.init.constant_(self.igate.bias, cfg.igate_bias_init)
        self.fgate.bias.copy_(torch.linspace(cfg.fgate_bias_init_min, cfg.fgate_bias_init_max, cfg.n_heads))
        nn.init.normal_(self.out_proj.weight, std=out_std)
        self.norm.init_weights()

    def projections(self, x: torch.Tensor) -> list[torch.Tensor]:
        """q(x), k(x), v(x), igate(x), fgate(x), ogate(x)."""
        mods = (self.q, self.k, self.v, self.igate, self.fgate, self.ogate)
        stacked = stacked_projections(x, mods)
        return stacked if stacked is not None else [m(x) for m in mods]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, d_model) -> q, k (B, T, H, Dqk), v (B, T, H, Dv), soft-capped i~, f~ (B, T, H) in
        float32 (the exponential gates are where precision matters), o (B, T, H * Dv) pre-sigmoid."""
        cfg = self.cfg
        q, k, v, i, f, o = self.projections(x)
        q = q.unflatten(-1, (-1, cfg.qk_head_dim))
        k = k.unflatten(-1, (-1, cfg.qk_head_dim))
        v = v.unflatten(-1, (-1, cfg.v_head_dim))
        i = soft_cap(i.float(), cfg.gate_soft_cap)
        f = soft_cap(f.float(), cfg.gate_soft_cap)
        return q, k, v, i, f, o

    def output(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """h (B, T, H, Dv), o (B, T, H * Dv) -> out_proj(sigmoid(o) * norm(h)) (B, T, d_model)."""
        return self.out_proj(self.norm(h, gate=o))

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, state: MLSTMState | None = None,
                return_state: bool = False):
        q, k, v, i, f, o = self.project(x)
        h = mlstm(q, k, v, i, f, eps=self.cfg.mlstm_eps, chunk_size=self.cfg.chunk_size, initial_state=state,
                  doc_ids=doc_ids, return_final_state=return_state)
        if return_state:
            h, state = h
            return self.output(h, o), state
        return self.output(h, o)

    def step(self, x: torch.Tensor, state: MLSTMState) -> tuple[torch.Tensor, MLSTMState]:
        """One token per row: x (B, d_model), state (C, n, m) -> (B, d_model), the next state (the
        kernel's single-step recurrence: no chunking, no padding to a chunk)."""
        q, k, v, i, f, o = self.project(x)  # (B, H, Dqk), ..., (B, H), (B, H * Dv)
        h, state = mlstm_step(q, k, v, i, f, state, eps=self.cfg.mlstm_eps)
        return self.output(h, o), state
