"""What every form of the Titans memory shares: the update rule, the memory network, the state.

The memory of one head is a small network M with weights W = (W_1, ..., W_L), W_l: (Din_l, Dout_l):
  L = 1  linear memory        M(x) = x W_1                          (Titans' linear memory)
  L >= 2 MLP with residual    M(x) = x + SiLU(... SiLU(x W_1) ...) W_L   (Titans eq. 16's deep memory)
Batched over rows and heads, weights are (B, H, Din, Dout) and inputs (B, H, N, Din).

The update rule (Miras' view, arXiv 2504.13173: architecture, attentional bias, retention, optimiser)
is configuration, not code forks:
  loss       "l2"    l(W; k, v) = ||M(k) - v||^2                      (Titans eq. 12)
             "huber" sum_i h(M(k)_i - v_i), h(r) = r^2 for |r| <= delta else 2 delta |r| - delta^2
                     (Miras' robust bias, scaled to equal l2 inside the quadratic region)
  optimizer  "momentum"  S_t = eta_t S_{t-1} - theta_t g_t            (Titans eq. 10)
             "sgd"       eta_t = 0: S_t = -theta_t g_t
  retention  "decay"     W_t = (1 - alpha_t) W_{t-1} + S_t            (Titans eq. 13)
             "none"      alpha_t = 0
  window     c = 1 Titans; c > 1 ATLAS's Omega rule (arXiv 2505.23735, eq. 9): g_t = sum over the last
             c tokens i of the document of gamma_i grad l(W; k_i, v_i)
  max_grad_norm  each token's inner gradient grad l(W; k_i, v_i) (all layers together) is scaled to
             this norm when larger (0: no clipping) -- titans-pytorch users needed it against
             divergence at T = 4096
  NaN guard  a token whose inner gradient is not finite (a non-finite target, an overflowing memory)
             contributes nothing (always on); non-finite keys or queries themselves are the caller's to avoid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

Weights = tuple[torch.Tensor, ...]  # W_1..W_L, each (B, H, Din_l, Dout_l)


class MemoryState(NamedTuple):
    """The memory after a token: weights and momentum (tuples of (B, H, Din_l, Dout_l), float32), and
    for the Omega rule (window c > 1) the last c - 1 tokens' k (B, c-1, H, Dk), v (B, c-1, H, Dv)
    and gamma (B, c-1, H) (gamma 0 where the slot is empty or of an earlier document); None for c = 1."""

    weights: Weights
    momentum: Weights
    window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class UpdateRule:
    """One point of the Miras design space (see the module docstring)."""

    loss: Literal["l2", "huber"] = "l2"
    huber_delta: float = 1.0
    optimizer: Literal["momentum", "sgd"] = "momentum"
    retention: Literal["decay", "none"] = "decay"
    window: int = 1
    max_grad_norm: float = 0.0

    def __post_init__(self):
        if self.loss not in ("l2", "huber"):
            raise ValueError(f"UpdateRule.loss = {self.loss!r}: choose 'l2' or 'huber'")
        if not self.huber_delta > 0:
            raise ValueError(f"UpdateRule.huber_delta = {self.huber_delta!r} must be > 0")
        if self.optimizer not in ("momentum", "sgd"):
            raise ValueError(f"UpdateRule.optimizer = {self.optimizer!r}: choose 'momentum' or 'sgd'")
        if self.retention not in ("decay", "none"):
            raise ValueError(f"UpdateRule.retention = {self.retention!r}: choose 'decay' or 'none'")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"UpdateRule.window = {self.window!r} must be an int >= 1 (1: Titans)")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"UpdateRule.max_grad_norm = {self.max_grad_norm!r} must be >= 0 (0: no clipping)")

    def gates(self, eta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The momentum and decay gates this rule uses: eta -> 0 for sgd, alpha -> 0 without retention."""
        if self.optimizer == "sgd":
            eta = torch.zeros_like(eta)
        if self.retention == "none":
            alpha = torch.zeros_like(alpha)
        return eta, alpha

    def loss_value(self, pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-token loss (..., N) of predictions and targets (..., N, Dv); the reference differentiates it."""
        r = pred - v
        if self.loss == "l2":
            return r.square().sum(-1)
        d = self.huber_delta
        return torch.where(r.abs() <= d, r.square(), 2 * d * r.abs() - d * d).sum(-1)

    def loss_grad(self, pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """d loss / d pred (..., N, Dv), written out: 2 r (l2), 2 clamp(r, -delta, delta) (huber)."""
        r = pred - v
        if self.loss == "huber":
            r = r.clamp(-self.huber_delta, self.huber_delta)
        return 2 * r


def memory_forward(weights: Weights, x: torch.Tensor) -> torch.Tensor:
    """M(x): weights W_l (B, H, Din_l, Dout_l) (or broadcastable), x (B, H, N, Din) -> (B, H, N, Dout)."""
    h = x
    for w in weights[:-1]:
        h = F.silu(h @ w)
    out = h @ weights[-1]
    return out if len(weights) == 1 else x + out


def check_weights(weights: Weights, dk: int, dv: int, what: str) -> None:
    """Raise ValueError unless `weights` chain Dk -> ... -> Dv (and Dk = Dv for the residual MLP)."""
    if not weights:
        raise ValueError(f"{what} must hold at least one weight matrix")
    dims = [w.shape[-2] for w in weights] + [weights[-1].shape[-1]]
    chained = all(w.shape[-1] == dims[i + 1] for i, w in enumerate(weights))
    if dims[0] != dk or dims[-1] != dv or not chained or (len(weights) > 1 and dk != dv):
        shapes = [tuple(w.shape) for w in weights]
        raise ValueError(f"{what} of shapes {shapes} must chain Dk = {dk} -> ... -> Dv = {dv} (Dk = Dv for "
                         "a memory of depth >= 2, which has a residual)")


def clip_and_guard(sq_norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """The factor each token's inner gradient is multiplied by, from its squared norm (any shape): 0
    where it is not finite (the NaN guard), min(1, max_grad_norm / norm) when clipping, else 1."""
    finite = torch.isfinite(sq_norm)
    scale = torch.ones_like(sq_norm)
    if max_grad_norm > 0:  # the clamp keeps sqrt's derivative finite at a zero gradient
        norm = torch.where(finite, sq_norm, torch.ones_like(sq_norm)).clamp_min(1e-30).sqrt()
        scale = torch.clamp(max_grad_norm / norm, max=1.0)
    return torch.where(finite, scale, torch.zeros_like(sq_norm))
