"""The recurrent-depth language model: embedding -> `layers` -> final RMSNorm -> LM head.

    arch ut      layers = [ACTLoop]                                 (act.py)
    arch huginn  layers = [prelude blocks..., RecurrentCore, coda blocks...]   (core.py)

The looped part is one entry of `layers`, so activation checkpointing, FSDP2 and the pipeline
split treat it as one unit (its shared weights are one parameter set, their gradients summed over
the steps by autograd). A plain single-device module: parallelism is applied from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from undertow.models.common.lm import CausalLMShell
from undertow.models.common.rope import rope_cos_sin
from undertow.models.depth import generate as decoding
from undertow.models.depth import ut_generate
from undertow.models.depth.act import ACTLoop
from undertow.models.depth.blocks import SandwichBlock
from undertow.models.depth.config import DepthConfig
from undertow.models.depth.core import RecurrentCore
from undertow.log import get_logger

log = get_logger("undertow.models.depth")


def build_layers(cfg: DepthConfig) -> list[nn.Module]:
    if cfg.arch == "ut":
        return [ACTLoop(cfg)]
    P, C = cfg.n_prelude, cfg.n_core  # blocks numbered prelude, core, coda (their MoE metrics' names)
    return ([SandwichBlock(cfg, i) for i in range(P)] + [RecurrentCore(cfg, P)]
            + [SandwichBlock(cfg, P + C + i) for i in range(cfg.n_coda)])


class DepthLM(CausalLMShell):
    """forward(input_ids (B, T), ...) -> logits (B, T, vocab_size) (CausalLMShell.forward)."""

    def __init__(self, cfg: DepthConfig):
        cfg.validate()
        super().__init__(cfg, build_layers(cfg))
        self._step_set = False

    @torch.no_grad()
    def init_weights(self) -> None:
        """CausalLMShell's init with the family's std (Huginn: sqrt(2 / (5 d)) when init_std is 0)."""
        std = self.cfg.init_std
        self.cfg.init_std = self.cfg.weight_std
        try:
            super().init_weights()
        finally:
            self.cfg.init_std = std

    @property
    def core(self) -> RecurrentCore | None:
        """Huginn's looped core (None for the Universal Transformer)."""
        return next((layer for layer in self.layers if isinstance(layer, RecurrentCore)), None)

    def set_training_step(self, step: int) -> None:
        """The trainer calls this before each step: Huginn's depth draw is seeded by it (the same
        draw on every rank, and after a resume). Without it every step draws step 0's depth."""
        self._step_set = True
        if self.core is not None:
            self.core.training_step = int(step)

    def set_depth(self, depth: int | None) -> None:
        """Run every forward (training too) at `depth` core steps (None: draw in training, the test
        depth in eval). Any depth >= 1, beyond training's max_depth too."""
        if depth is not None and depth < 1:
            raise ValueError(f"depth = {depth} must be >= 1")
        if self.core is None:
            raise ValueError("set_depth is for arch = 'huginn'; the Universal Transformer halts by ACT")
        self.core.depth = depth

    def layer_context(self, input_shape, device, *, position_ids=None, doc_ids=None, cu_seqlens=None,
                      max_seqlen=None) -> dict:
        """RoPE cos/sin (B, T, head_dim) from position_ids (arange(T) when absent), the documents, and
        the position ids themselves (Huginn's s_0 is a function of the position)."""
        B, T = input_shape
        if position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        return {"cos": cos, "sin": sin, "doc_ids": doc_ids, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen,
                "position_ids": position_ids}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True, **options) -> torch.Tensor:
        """Continue each row of `input_ids` (B, T) by `max_new_tokens` tokens, with key/value caches.
        Huginn: generate.py (options depth, cache, exit_threshold, stats); the UT: ut_generate.py (one
        cache per ACT step; no options)."""
        if self.core is None:
            if options:
                raise ValueError(f"the Universal Transformer's decoding takes no options, got {sorted(options)}")
            return ut_generate.generate(self, input_ids, max_new_tokens, greedy)
        return decoding.generate(self, input_ids, max_new_tokens, greedy=greedy, **options)

    def embed_stage(self, input_ids: torch.Tensor, ctx: dict) -> tuple[torch.Tensor]:
        if self.training and self.core is not None and not self._step_set:
            log.warning("DepthLM.set_training_step was never called: every step draws the depth of step 0")
            self._step_set = True  # warn once
        x = self.embed(input_ids)
        return (x * self.cfg.input_scale if self.cfg.input_scale != 1.0 else x,)
