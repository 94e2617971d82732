"""Hyper-parameters of the mixture-of-experts MLP, shared by every family (`model.moe.*`).

The transformer, Titans and depth families replace every block's MLP by an MoE layer when
n_experts > 0 (depth: linear router only, depth/config.py says why); the Mamba, xLSTM and ParaRNN
families place one where their layer_pattern has an `E`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from undertow.configtools import check, opt

ROUTERS = {
    "linear": "logits = W x per layer (Mixtral, OLMoE)",
    "rmoe": "RMoE: h_l = GRU(W1_l x, h_(l-1)) with one GRU cell shared by all layers, logits = W2_l h_l",
}


@dataclass
class MoEConfig:
    n_experts: int = opt(0, help="Experts per MoE layer E (transformer: 0 = a dense MLP in every block).")
    top_k: int = opt(2, help="Experts per token (softmax over the E logits, top-k, renormalised).")
    expert_hidden: int = opt(0, help="SwiGLU width of each expert (0: the family's dense MLP width).")
    shared_expert_hidden: int = opt(0, help="Width of a shared SwiGLU expert every token goes through (0: none).")
    router: Literal["linear", "rmoe"] = opt("linear", help="linear (per-layer W x) or rmoe (layerwise GRU router).")
    router_dim: int = opt(256, help="rmoe: GRU width r (x' = W1 x maps d_model -> r; the paper's 256).")
    aux_loss_coef: float = opt(0.01, help="Switch load-balancing loss coefficient (0: off).")
    z_loss_coef: float = opt(0.001, help="Router z-loss coefficient, mean(logsumexp(logits)^2) (0: off).")

    @property
    def enabled(self) -> bool:
        return self.n_experts > 0

    def validate(self, required: bool = False) -> None:
        """`required`: the family has MoE layers (an `E` in its pattern), so n_experts must be >= 1."""
        low = 1 if required else 0
        check(self.n_experts >= low, "model.moe.n_experts", self.n_experts,
              "must be >= 1 (the layer_pattern has E layers)" if required else "must be >= 0 (0: dense MLP)")
        if not self.enabled:
            return
        check(1 <= self.top_k <= self.n_experts, "model.moe.top_k", self.top_k,
              f"must be in [1, n_experts = {self.n_experts}]")
        check(self.expert_hidden >= 0, "model.moe.expert_hidden", self.expert_hidden,
              "must be >= 0 (0: the dense MLP width)")
        check(self.shared_expert_hidden >= 0, "model.moe.shared_expert_hidden", self.shared_expert_hidden,
              "must be >= 0 (0: no shared expert)")
        check(self.router in ROUTERS, "model.moe.router", self.router,
              "choose one of " + ", ".join(f"{k!r} ({v})" for k, v in ROUTERS.items()))
        check(self.router_dim >= 1, "model.moe.router_dim", self.router_dim, "must be >= 1 (the paper: 256)")
        check(self.aux_loss_coef >= 0, "model.moe.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        check(self.z_loss_coef >= 0, "model.moe.z_loss_coef", self.z_loss_coef, "must be >= 0")

    def hidden(self, dense_hidden: int) -> int:
        return self.expert_hidden or dense_hidden

    def layer_params(self, d_model: int, dense_hidden: int) -> tuple[int, int]:
        """(total, active per token) matmul weights of one MoE layer: experts, shared expert, router
        (rmoe: its per-layer W1 and W2; the shared GRU is counted by `shared_router_params`)."""
        expert = 3 * d_model * self.hidden(dense_hidden)
        shared = 3 * d_model * self.shared_expert_hidden
        if self.router == "rmoe":
            router = d_model * self.router_dim + self.router_dim * self.n_experts
        else:
            router = d_model * self.n_experts
        return self.n_experts * expert + shared + router, self.top_k * expert + shared + router

    def mlp_active_params(self, d_model: int, dense_hidden: int) -> int:
        """Weights one token multiplies by in a family's MLP slot: the dense SwiGLU (3 d h) without
        experts, else the layer's active weights and the rmoe GRU (it runs once per MoE layer)."""
        if not self.enabled:
            return 3 * d_model * dense_hidden
        return self.layer_params(d_model, dense_hidden)[1] + self.shared_router_params()

    def mlp_tp_limit(self, dense_hidden: int) -> tuple[str, str, int]:
        """What tensor parallelism splits in a family's MLP slot (a shape_limits entry): the SwiGLU's
        hidden units, or each expert's width (parallel/expert.py)."""
        if not self.enabled:
            return "tp", "ffn_hidden", dense_hidden
        return "tp", "the expert width (model.moe.expert_hidden)", self.hidden(dense_hidden)

    def shared_router_params(self) -> int:
        """Weights of the GRU cell all rmoe layers share (3 gates, input and hidden, with biases)."""
        return 0 if self.router != "rmoe" else 3 * (2 * self.router_dim * self.router_dim + 2 * self.router_dim)
