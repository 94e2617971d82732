"""The neural long-term memory as a layer: projections and gates around kernels/titans_memory.

x (B, T, d_model) -> q, k, v (B, T, H, Dm) per memory head (keys and queries SiLU then L2-normalised,
the paper's section 4.4), theta = max_lr * sigmoid(.), eta, alpha (and the Omega gates gamma) =
sigmoid(.) per head and token; the memory's initial weights M_0 (per head) are parameters, learned by
the outer loop; y = out_proj(memory read). Heads never interact inside the memory, so tensor
parallelism splits every projection by head (plan.py).

Decoding reproduces the chunk-start rule of training exactly: the state kept between tokens is the
memory at the last chunk boundary plus the kernel inputs of the tokens since (fewer than chunk_size);
each new token reruns that partial chunk from the boundary (O(chunk_size) work per token) and the
boundary moves when the chunk is full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from undertow.kernels.titans_memory import MemoryState, memory_forward, start_state, titans_memory
from undertow.kernels.titans_memory.context import flat_shapes, unflatten
from undertow.models.common.shards import local_shard
from undertow.models.titans.config import TitansConfig

INPUTS = ("q", "k", "v", "theta", "eta", "alpha", "gamma")


@dataclass
class DecodeState:
    """The memory at the last chunk boundary and the kernel inputs of the tokens since (dim 1 < chunk)."""

    boundary: MemoryState
    pending: dict


class NeuralMemory(nn.Module):
    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.cfg = cfg
        d, H, Dm = cfg.d_model, cfg.mem_heads, cfg.mem_head_dim
        self.head_dim = Dm
        self.q_proj = nn.Linear(d, H * Dm, bias=False)
        self.k_proj = nn.Linear(d, H * Dm, bias=False)
        self.v_proj = nn.Linear(d, H * Dm, bias=False)
        self.theta_proj = nn.Linear(d, H)
        self.eta_proj = nn.Linear(d, H)
        self.alpha_proj = nn.Linear(d, H)
        self.gamma_proj = nn.Linear(d, H) if cfg.omega_window > 1 else None
        dims = cfg.mem_dims
        self.memory = nn.ParameterList(nn.Parameter(torch.empty(H, a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.out_proj = nn.Linear(H * Dm, d, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=std)
        for proj, bias in ((self.theta_proj, 0.0), (self.eta_proj, 2.0), (self.alpha_proj, -4.0),
                           (self.gamma_proj, 2.0)):
            if proj is not None:  # eta ~ 0.88 (long momentum), alpha ~ 0.02 (slow forgetting) at the start
                nn.init.normal_(proj.weight, std=std)
                nn.init.constant_(proj.bias, bias)
        for w in self.memory:  # M_0: variance-preserving per layer
            nn.init.normal_(w, std=w.shape[1] ** -0.5)
        nn.init.normal_(self.out_proj.weight, std=out_std)

    def initial_weights(self) -> tuple[torch.Tensor, ...]:
        """M_0 of this rank's heads (all heads without tensor parallelism): (H, Din_l, Dout_l) each."""
        return tuple(local_shard(w) for w in self.memory)

    def keys(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """SiLU then L2-normalised per head: x (B, T, d_model) -> (B, T, H, Dm) (H: this rank's heads)."""
        B, T, _ = x.shape
        return F.normalize(F.silu(proj(x).view(B, T, -1, self.head_dim)), dim=-1)

    def inputs(self, x: torch.Tensor) -> dict:
        """x (B, T, d_model) -> the kernel's inputs: q, k, v (B, T, H, Dm); theta, eta, alpha, gamma (B, T, H)."""
        B, T, _ = x.shape
        out = {"q": self.keys(self.q_proj, x), "k": self.keys(self.k_proj, x),
               "v": self.v_proj(x).view(B, T, -1, self.head_dim),
               "theta": self.cfg.max_lr * torch.sigmoid(self.theta_proj(x)),
               "eta": torch.sigmoid(self.eta_proj(x)), "alpha": torch.sigmoid(self.alpha_proj(x))}
        out["gamma"] = torch.sigmoid(self.gamma_proj(x)) if self.gamma_proj is not None else None
        return out

    def run(self, ins: dict, initial_state=None, doc_ids=None, return_state=False):
        """The kernel on `inputs(x)` -> memory read (B, T, H, Dm) [, final MemoryState]."""
        cfg = self.cfg
        return titans_memory(ins["q"], ins["k"], ins["v"], ins["theta"], ins["eta"], ins["alpha"],
                             self.initial_weights(), gamma=ins["gamma"], rule=cfg.rule, chunk_size=cfg.chunk_size,
                             initial_state=initial_state, doc_ids=doc_ids, return_final_state=return_state,
                             recompute=cfg.mem_recompute)

    def project_out(self, read: torch.Tensor) -> torch.Tensor:
        """(B, T, H, Dm) -> (B, T, d_model)."""
        return self.out_proj(read.flatten(2).to(self.out_proj.weight.dtype))

    def forward(self, x: torch.Tensor, doc_ids=None) -> torch.Tensor:
        return self.project_out(self.run(self.inputs(x), doc_ids=doc_ids))

    def fresh_state(self, batch: int, like: torch.Tensor) -> MemoryState:
        """M_0 with zero momentum (and an empty Omega window) for `batch` rows."""
        m0 = self.initial_weights()
        dtype = torch.float64 if m0[0].dtype == torch.float64 else torch.float32  # the kernel's
        k = like.new_zeros(batch, 1, m0[0].shape[0], self.head_dim, dtype=dtype)
        return start_state(m0, batch, k, k, self.cfg.rule, dtype)

    def flat_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Shapes of the flat state context parallelism passes (kernels/titans_memory/context.py)."""
        m0 = self.initial_weights()
        return flat_shapes(batch, m0, self.cfg.rule, m0[0].shape[0], self.head_dim, self.head_dim)

    def unflatten(self, flat: tuple) -> MemoryState:
        """The flat state -> MemoryState (rows with live = 0 restart from M_0)."""
        k = flat[0].new_zeros(flat[0].shape[0], 1, self.initial_weights()[0].shape[0], self.head_dim)
        return unflatten(flat, self.initial_weights(), self.cfg.rule, k, k)

    def read(self, state: MemoryState, x: torch.Tensor) -> torch.Tensor:
        """The memory `state` answering the queries of x (B, T, d_model) without an update -> (B, T, H, Dm)."""
        q = self.keys(self.q_proj, x)
        return memory_forward(state.weights, q.transpose(1, 2).to(state.weights[0].dtype)).transpose(1, 2)

    # ---- decoding: the state at the last chunk boundary plus the pending tokens' inputs
    def prefill(self, ins: dict, state: MemoryState | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Kernel inputs of a prompt (T tokens) -> the read (B, T, H, Dm) and the decoding state."""
        T = ins["q"].shape[1]
        full = T // self.cfg.chunk_size * self.cfg.chunk_size
        head = {n: (t[:, :full] if t is not None else None) for n, t in ins.items()}
        tail = {n: (t[:, full:] if t is not None else None) for n, t in ins.items()}
        y_head, boundary = self.run(head, initial_state=state, return_state=True) if full else (None, state)
        if boundary is None:
            boundary = self.fresh_state(ins["q"].shape[0], ins["q"])
        y_tail = self.run(tail, initial_state=boundary) if full < T else None
        y = torch.cat([t for t in (y_head, y_tail) if t is not None], 1)
        return y, DecodeState(boundary, tail)

    def step(self, ins: dict, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """One token's kernel inputs (dim 1 of size 1) -> its read (B, 1, H, Dm), the next state."""
        pending = {n: (torch.cat([state.pending[n], t], 1) if t is not None else None) for n, t in ins.items()}
        y, final = self.run(pending, initial_state=state.boundary, return_state=True)
        if pending["q"].shape[1] == self.cfg.chunk_size:
            return y[:, -1:], DecodeState(final, {n: (t[:, :0] if t is not None else None) for n, t in pending.items()})
        return y[:, -1:], DecodeState(state.boundary, pending)
