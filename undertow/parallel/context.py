"""Context parallelism (CP): every row's sequence split contiguously over the ranks of a cp group.

    cp = apply_context_parallel(model, mesh["cp"])      # before activation checkpointing / compile
    local = shard_batch(batch, cp.rank, cp.world)       # tokens [r T/cp, (r+1) T/cp) of each row
    loss_sum = lm_loss_sum(model(local["input_ids"], position_ids=..., doc_ids=...), local["labels"])
    loss_sum.backward()                                 # collectives inside; every cp rank calls it
    all_reduce_gradients(model, cp.group)               # or FSDP2 over "dp_shard_cp", which sums them

How it is applied: the model stays a plain module. Each kernel's public function asks the hook
point, `kernels.context.context_parallel_op(op)`, whether CP is active; `apply_context_parallel`
wraps the forward of every block in `model.layers` so that it is, for that model only (a
ContextVar, set again when activation checkpointing recomputes a block). Ops then run the CP form
this package installs:
  - recurrences whose state after a slice is affine in the state before it pass states between
    ranks (context_state.py): scan from zero, all-gather (final state, transition), fold, re-run. Each
    op's state math is its `StatePassing`, in its own folder (kernels/<op>/context.py);
  - recurrences whose state does not compose (a SerialPassing) run their slices rank after rank,
    the state sent point to point (context_serial.py);
  - ops that solve across the ranks themselves (a SpanningSolve: an iterative solver whose linear
    systems span the ranks) get the cp group as their `links` (rank, world, counted all_gather);
  - attention all-gathers K/V and masks with global positions and documents (context_attention.py).
Nothing here knows a model family or a recurrence op: a new op adds kernels/<op>/context.py and the
hook call in its public function, and this package does not change.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from undertow.kernels.context import (
    SERIAL, SPANNING, STATE_PASSING, SerialPassing, SpanningSolve, StatePassing, active, install_handler,
)
from undertow.parallel.context_attention import attention_handler
from undertow.parallel.context_comm import all_gather
from undertow.parallel.context_serial import run_serial
from undertow.parallel.context_state import run_state_passing

SHARDED_KEYS = ("input_ids", "labels", "position_ids", "doc_ids")
DROPPED_KEYS = ("cu_seqlens", "max_seqlen")  # describe the whole row; CP ranks mark documents by doc_ids


@dataclass(frozen=True)
class ContextParallel:
    """The cp process group a model runs under."""

    group: dist.ProcessGroup

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every cp rank's `tensor`, in rank order (counted; no autograd): the links of a SpanningSolve."""
        return all_gather(tensor, self.group)


def _state_passing_handler(cp: ContextParallel, spec: StatePassing, fn, *args, **kwargs):
    return run_state_passing(cp, spec, fn, args, kwargs)


def _serial_handler(cp: ContextParallel, spec: SerialPassing, fn, *args, **kwargs):
    return run_serial(cp, spec, fn, args, kwargs)


def _spanning_handler(cp: ContextParallel, spec: SpanningSolve, fn, *args, **kwargs):
    return spec.solve(cp, args, kwargs)


install_handler(STATE_PASSING, _state_passing_handler)
install_handler(SERIAL, _serial_handler)
install_handler(SPANNING, _spanning_handler)
install_handler("attention", attention_handler)


def _under_context(forward, cp: ContextParallel):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with active(cp):
            return forward(*args, **kwargs)

    return run


def _checked_model_forward(forward):
    @functools.wraps(forward)
    def run(input_ids, **kwargs):
        if kwargs.get("position_ids") is None:
            raise ValueError("under context parallelism the model needs the global position_ids of its slice; "
                             "shard the batch with undertow.parallel.context.shard_batch")
        if kwargs.get("cu_seqlens") is not None:
            raise ValueError("under context parallelism documents are marked by doc_ids, not cu_seqlens "
                             "(shard_batch drops cu_seqlens)")
        return forward(input_ids, **kwargs)

    return run


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh | dist.ProcessGroup) -> ContextParallel:
    """Run `model`'s blocks under context parallelism over the 1-D mesh (or process group) `cp_mesh`.
    In place; parameters and their names are unchanged. With one cp rank, nothing is installed."""
    group = cp_mesh.get_group() if isinstance(cp_mesh, DeviceMesh) else cp_mesh
    cp = ContextParallel(group)
    if cp.world == 1:
        return cp
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList to run under context parallelism")
    if getattr(model, "context_parallel", None) is not None:
        raise RuntimeError("context parallelism is already applied to this model")
    for block in layers:
        forward = block.forward
        if isinstance(forward, functools.partial) or getattr(block, "_compiled_call_impl", None) is not None:
            raise RuntimeError("apply context parallelism before activation checkpointing and torch.compile: "
                               "a recomputed block must run under it too")
        block.forward = _under_context(forward, cp)
    model.forward = _checked_model_forward(model.forward)
    model.context_parallel = cp
    return cp


def shard_batch(batch: dict, rank: int, world: int) -> dict:
    """This cp rank's slice of a loader batch: input_ids, labels, position_ids, doc_ids (B, T) ->
    (B, T / world), tokens [rank T/world, (rank+1) T/world). position_ids (from arange when absent)
    stay global, so RoPE sees the true positions; cu_seqlens and max_seqlen are dropped. Other keys
    pass through unchanged."""
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    if T % world:
        raise ValueError(f"sequence length {T} must be a multiple of the cp degree {world}")
    if batch.get("doc_ids") is None and batch.get("cu_seqlens") is not None:
        raise ValueError("context parallelism needs doc_ids in the batch to mark documents (cu_seqlens alone "
                         "describes the unsplit row)")
    full = dict(batch)
    if full.get("position_ids") is None:
        full["position_ids"] = torch.arange(T, device=input_ids.device).expand(B, T)
    length = T // world
    local = {k: v for k, v in full.items() if k not in SHARDED_KEYS + DROPPED_KEYS}
    for key in SHARDED_KEYS:
        if full.get(key) is not None:
            local[key] = full[key][:, rank * length : (rank + 1) * length].contiguous()
    return local


def reduce_loss(loss_sum: torch.Tensor, group) -> torch.Tensor:
    """The row's summed token loss: the sum over cp ranks of their local sums (detached, for logging;
    each rank back-propagates its own local sum)."""
    total = loss_sum.detach().clone()
    dist.all_reduce(total, group=group)
    return total


def all_reduce_gradients(model: nn.Module, group) -> None:
    """Sum every parameter's gradient over the cp ranks (each holds its slice's part). FSDP2 over a
    mesh that includes cp does this itself."""
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
