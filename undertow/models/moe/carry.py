"""The router state of RMoE carried with the activations, for any CausalLMShell with MoE layers.

The shell's `carried` tuple (models/common/lm.py) becomes (hidden, h) when the model's MoE layers
use the rmoe router: h (B, T, router_dim) starts at 0 in the embed step and every MoE layer
replaces it; other layers pass it through. Pipeline stages send the whole tuple to the next stage,
so the state crosses stage boundaries with the activations. With the linear router (or no MoE)
`carried` stays (hidden,) and nothing changes for the family.

A family mixes `RouterCarry` into its shell (before CausalLMShell) and calls `setup_router(moe_cfg,
has_moe)` in __init__ and `init_router()` in init_weights; the mixin's embed_stage and run_layer
route the carried tuple through `add_router_state` and `call_layer` (a shell whose embedding step
differs, e.g. a float32 residual, overrides embed_stage with add_router_state). MoE blocks have
`is_moe = True` and take router_state= and router_gru= keywords, returning (x, new state or None).
"""

from __future__ import annotations

import torch

from undertow.models.moe.config import MoEConfig
from undertow.models.moe.router import RouterGRU


class RouterCarry:
    router_gru: RouterGRU | None
    # modules of the shell that its blocks use (parallel/ places them: tensor parallelism replicates
    # them; pipeline parallelism keeps a copy on each stage's rank and sums their gradients over the stages)
    shared_by_blocks = ("router_gru",)

    def setup_router(self, moe: MoEConfig, has_moe: bool) -> None:
        """The GRU cell all RMoE layers share (a submodule of the shell), or None."""
        self.router_gru = RouterGRU(moe.router_dim) if has_moe and moe.router == "rmoe" else None

    @torch.no_grad()
    def init_router(self) -> None:
        if self.router_gru is not None:
            self.router_gru.init_weights()

    def embed_stage(self, input_ids: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, ...]:
        """(embed(input_ids),) and, with the rmoe router, its h_0."""
        return self.add_router_state(self.embed(input_ids), input_ids)

    def run_layer(self, layer, carried: tuple[torch.Tensor, ...], ctx: dict) -> tuple[torch.Tensor, ...]:
        return self.call_layer(layer, carried, **ctx)

    def add_router_state(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(hidden,) or, with the rmoe router, (hidden, h_0 = zeros (B, T, router_dim))."""
        if self.router_gru is None:
            return (hidden,)
        dim = self.router_gru.cell.hidden_size
        return hidden, torch.zeros(*input_ids.shape, dim, device=input_ids.device, dtype=self.router_gru.cell.weight_ih.dtype)

    def call_layer(self, layer, carried: tuple[torch.Tensor, ...], **kwargs) -> tuple[torch.Tensor, ...]:
        """layer(carried[0], **kwargs) with the router state in and out for MoE layers; the state
        passes other layers untouched."""
        if not getattr(layer, "is_moe", False):
            return (layer(carried[0], **kwargs), *carried[1:])
        state = carried[1] if len(carried) > 1 else None
        x, state = layer(carried[0], **kwargs, router_state=state, router_gru=self.router_gru)
        return (x,) if state is None else (x, state)
