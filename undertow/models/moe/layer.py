"""The MoE SwiGLU layer: route each token to top-k of E experts, run them dropless, mix.

    logits = router(x)                      (N, E) float32, N = B * T tokens
    p = softmax(logits); w, idx = top-k(p); w = w / sum(w)        (Mixtral's token choice)
    out = sum_j w_j expert_{idx_j}(x) [+ shared_expert(x)]        (kernels/moe: grouped GEMMs)

Aux losses, added to the backward through models/common/aux.py (no forward signature changes):
    load balance (Switch Transformer): E * sum_e f_e P_e, f_e the fraction of the N*k routed
        pairs that go to e, P_e the mean router probability of e; 1 when balanced
    z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2
both over the tokens of the forward on every data/context-parallel rank (models/moe/balance.py: the
same numbers under every layout), and metrics per layer: the load f_e * E (min, max) and the load
entropy / log E. The routed pairs per expert of the training forwards add up over the run
(`routed_total`) for the table written at its end (models/moe/load_table.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from undertow.kernels.moe import moe_experts
from undertow.models.common.aux import add_aux_loss, record_metric, recording
from undertow.models.common.mlp import SwiGLU
from undertow.models.moe.balance import balance_losses
from undertow.models.moe.config import MoEConfig
from undertow.models.moe.router import build_router, linear, local


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, E) -> probabilities (N, E), top-k ids (N, k), renormalised weights (N, k)."""
    probs = torch.softmax(logits, dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    return probs, idx, top / top.sum(-1, keepdim=True)


class MoELayer(nn.Module):
    """x (..., d_model) [, router state (..., r)] -> (out (..., d_model), new router state or None).

    Computes on plain tensors: under tensor parallelism the router and shared expert are replicated
    DTensors (models/transformer/plan.py moe_styles) and their local values are used; the experts'
    width is split over tp by parallel/expert.py (partial outputs summed after the combine).

    Expert weights are stacked: w_gate, w_up (E, d, h), w_down (E, h, d). `index`: the layer's depth
    (its metrics are named by it).

    Expert parallelism (parallel/expert.py) finds the layer by `expert_parallel_plan` and sets
    `expert_compute` (moe_experts' signature, the weights passed as the parameters are: DTensors
    whose local values are this rank's experts) to its all-to-all dispatch."""

    expert_compute = None  # None: kernels/moe on all E experts (one device)
    token_group = None  # the ranks whose tokens the router losses are taken over (None: this process's)

    def __init__(self, d_model: int, dense_hidden: int, cfg: MoEConfig, index: int = 0):
        super().__init__()
        self.cfg, self.index = cfg, index
        E, h = cfg.n_experts, cfg.hidden(dense_hidden)
        self.router = build_router(d_model, cfg)
        self.w_gate = nn.Parameter(torch.empty(E, d_model, h))
        self.w_up = nn.Parameter(torch.empty(E, d_model, h))
        self.w_down = nn.Parameter(torch.empty(E, h, d_model))
        self.shared_expert = SwiGLU(d_model, cfg.shared_expert_hidden) if cfg.shared_expert_hidden else None
        # (E,) float64 routed pairs of this layer's training forwards, over the token group's ranks
        # (not a buffer: checkpoints keep the weights only; the count restarts with each process)
        self.routed_total: torch.Tensor | None = None

    def set_token_group(self, group) -> None:
        """The process group of the ranks that hold other tokens of the same micro-batch (data and
        context parallel), set by parallel/apply.py; the router losses sum their statistics."""
        self.token_group = group

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=out_std)
        if self.shared_expert is not None:
            self.shared_expert.init_weights(std, out_std)

    def inactive_parameters(self) -> int:
        """Expert weights a token does not use (E - top_k experts): total - active, for the planner."""
        per_expert = self.w_gate[0].numel() + self.w_up[0].numel() + self.w_down[0].numel()
        return (self.cfg.n_experts - self.cfg.top_k) * per_expert

    def expert_parallel_plan(self) -> tuple[int, tuple[str, ...]]:
        """(E, the names of the stacked expert weights, expert on dim 0) for expert parallelism."""
        return self.cfg.n_experts, ("w_gate", "w_up", "w_down")

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, gru: nn.Module | None = None):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        flat_state = None if state is None else state.reshape(tokens.shape[0], -1)
        logits, new_state = self.router(tokens, flat_state, gru)
        probs, idx, weights = route(logits, self.cfg.top_k)
        if self.expert_compute is not None:  # expert parallelism: this rank's experts, taken as they are
            out = self.expert_compute(tokens, idx, weights, self.w_gate, self.w_up, self.w_down)
        else:
            out = moe_experts(tokens, idx, weights, local(self.w_gate), local(self.w_up), local(self.w_down))
        if self.shared_expert is not None:  # SwiGLU, on plain weights (see router.local)
            s = self.shared_expert
            out = out + linear(F.silu(linear(tokens, s.gate_proj)) * linear(tokens, s.up_proj), s.down_proj)
        if torch.is_grad_enabled():
            out = self._add_losses(out, logits, probs, idx)
        if new_state is not None:
            new_state = new_state.reshape(*shape[:-1], -1)
        return out.reshape(shape), new_state

    @torch.compiler.disable  # eager under torch.compile: host-side bookkeeping
    def _count_routed(self, counts: torch.Tensor) -> None:
        """Add a forward's routed pairs per expert (E,) to the run's: a training step's forwards only,
        not a recomputation for activation checkpointing (it runs inside the backward) nor a pipeline
        stage's shape inference (metrics paused there)."""
        if recording() and torch._C._current_graph_task_id() == -1:
            self.routed_total = counts if self.routed_total is None else self.routed_total + counts

    def _add_losses(self, out, logits, probs, idx):
        balance, z, load, counts = balance_losses(logits, probs, idx, self.token_group)
        self._count_routed(counts)
        aux = self.cfg.aux_loss_coef * balance + self.cfg.z_loss_coef * z
        if aux.requires_grad:
            out = add_aux_loss(out, aux)
        prefix = f"moe/layer{self.index}"
        record_metric(f"{prefix}/balance_loss", balance)
        record_metric(f"{prefix}/z_loss", z)
        record_metric(f"{prefix}/load_min", load.min())
        record_metric(f"{prefix}/load_max", load.max())
        share = load / load.sum()
        entropy = -(share * share.clamp_min(1e-12).log()).sum() / math.log(max(len(load), 2))
        record_metric(f"{prefix}/load_entropy", entropy)
        return out
