"""Optimizer construction."""

import torch
from torch import nn

from undertow.log import get_logger
from undertow.pretrain.config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases and embedding tables undecayed (tied heads count once)."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; fused when asked or (auto) when the device supports it (CUDA and CPU in torch >= 2.4)."""
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type in ("cuda", "cpu"))
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused
    )
    get_logger("undertow.optim").info("optimizer: AdamW (fused=%s)", fused)
    return opt
