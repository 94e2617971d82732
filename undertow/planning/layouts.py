"""Every parallel layout of N GPUs, estimated (memory.py) and sorted best first.

A layout is (pp, dp_replicate, dp_shard, cp, tp) with product N, activation checkpointing on or
off, and a ZeRO stage: 1, 2 or 3 when it has ranks to shard over (dp_shard x cp > 1), else 0.
For a MoE model, each FSDP layout (ZeRO-3) whose dp_shard x cp divides the experts is also listed
with every ep > 1 that divides dp_shard x cp (expert parallelism: ep = dp_shard x cp, or groups of
ep ranks whose experts the dp_shard x cp / ep groups replicate), with pp and tp too.
"""

from __future__ import annotations

from collections.abc import Iterator

from undertow.parallel.mesh import MESH_NAMES, divisors
from undertow.planning.memory import Estimate, Layout, ModelFacts, Setup, estimate


def _factorizations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Ordered tuples of `parts` positive integers whose product is n."""
    if parts == 1:
        yield (n,)
        return
    for d in divisors(n):
        for rest in _factorizations(n // d, parts - 1):
            yield (d, *rest)


def layouts(gpus: int, n_experts: int = 0) -> Iterator[Layout]:
    for degrees in _factorizations(gpus, len(MESH_NAMES)):
        dims = dict(zip(MESH_NAMES, degrees))
        stages = (1, 2, 3) if dims["dp_shard"] * dims["cp"] > 1 else (0,)
        shard = dims["dp_shard"] * dims["cp"]  # each of these ranks stores E / shard experts (parallel/expert.py)
        eps = [ep for ep in divisors(shard) if ep > 1] if n_experts and n_experts % shard == 0 else []
        for ac in (False, True):
            for zero in stages:
                yield Layout(**dims, ac=ac, zero=zero)
            for ep in eps:
                yield Layout(**dims, ep=ep, ac=ac, zero=3)


def sort_key(est: Estimate) -> tuple:
    """Fitting layouts first, fastest first; among equally fast ones (the step-time model has no
    communication term) the one with less communication: smaller tp, cp, pp and ZeRO stage, fewer
    all-to-all bytes (expert parallelism), then less memory."""
    lay = est.layout
    return (not est.fits, -est.tokens_per_s, lay.tp, lay.cp, lay.pp, lay.zero, est.all_to_all, est.total)


def plan_layouts(facts: ModelFacts, setup: Setup) -> list[Estimate]:
    """Every layout of setup.gpus GPUs with its estimate, best first (see sort_key)."""
    return sorted((estimate(layout, facts, setup) for layout in layouts(setup.gpus, facts.n_experts)), key=sort_key)
