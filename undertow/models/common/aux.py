"""Auxiliary losses and metrics that modules add from inside their forward (MoE load balancing and
router z-loss, ACT ponder cost, a Newton solver's residual) without changing any forward signature,
so they pass through pipeline stages, FSDP and activation checkpointing untouched.

    x = add_aux_loss(x, coef * load_balance)   # returns x; backward adds d(coef * lb * scale)/d(...)
    record_metric("moe/load_max", value)       # a detached scalar, averaged over the step, logged

The trick (Megatron-LM's aux-loss auto-scaler): `add_aux_loss` is an identity on `x` whose backward
also sends the gradient `scale` into `loss`, so the loss joins the backward pass wherever the
activations go. `scale` comes from the collector the trainer opens around a step
(`collect_aux(loss_scale=1 / forwards per step)`), so the step's objective gains the aux loss once,
averaged over micro-batches and data ranks (the trainer's data-parallel gradient averaging does
the rest); outside a collector (tests, scripts) the scale is 1.

Metrics are means of every value recorded under a name during the step; recorded again by
activation checkpointing's recomputation they are the same values, so the mean does not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_ACTIVE: list["StepAux"] = []
_PAUSED: list[bool] = []


class StepAux:
    """What the modules recorded during one training step."""

    def __init__(self, loss_scale: float = 1.0):
        self.loss_scale = float(loss_scale)
        self._values: dict[str, list[torch.Tensor]] = {}

    def record(self, name: str, value: torch.Tensor | float) -> None:
        value = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if hasattr(value, "full_tensor"):  # a DTensor scalar under tensor parallelism
            value = value.full_tensor()
        self._values.setdefault(name, []).append(value)

    def means(self) -> dict[str, float]:
        """name -> mean of the values recorded under it (one host sync for all of them)."""
        if not self._values:
            return {}
        names = sorted(self._values)
        stacked = torch.stack([torch.stack([v.to(self._values[names[0]][0].device) for v in self._values[n]]).mean()
                               for n in names]).cpu().tolist()
        return dict(zip(names, stacked))


@contextlib.contextmanager
def collect_aux(loss_scale: float = 1.0) -> Iterator[StepAux]:
    """Collect the aux losses' scale and the metrics of the forwards run inside (one step)."""
    step = StepAux(loss_scale)
    _ACTIVE.append(step)
    try:
        yield step
    finally:
        _ACTIVE.remove(step)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Record no metric inside (a forward that is not one of the step's, e.g. a pipeline stage run
    on uninitialized inputs to learn its output shapes)."""
    _PAUSED.append(True)
    try:
        yield
    finally:
        _PAUSED.pop()


def current_loss_scale() -> float:
    return _ACTIVE[-1].loss_scale if _ACTIVE else 1.0


def recording() -> bool:
    """A training step's forward is running: a collector is open, not paused, grad enabled (what
    `record_metric` records under; modules that count over the run use it too)."""
    return bool(_ACTIVE) and not _PAUSED and torch.is_grad_enabled()


def record_metric(name: str, value: torch.Tensor | float) -> None:
    """Record a scalar under `name` for this step's log (no-op outside a collector, e.g. in eval)."""
    if recording():
        _ACTIVE[-1].record(name, value)


class _AddAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


def add_aux_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """`x` unchanged; the backward pass through it adds the gradient of `loss` (a scalar already
    multiplied by its coefficient) times the step's loss scale. Without grad it does nothing."""
    if not (torch.is_grad_enabled() and loss.requires_grad):
        return x
    return _AddAuxLoss.apply(x, loss, current_loss_scale())
