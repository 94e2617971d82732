"""Where a layer stack is cut into pipeline stages, and which rank runs which stage.

    costs  = stage_costs(spec, model_cfg, seq_len)        # per layer, + embedding / head extras
    counts = balance_stages(costs.layers, 4, costs.first, costs.last)   # layers per stage
    counts = resolve_split(counts_from_config, costs, 4)   # pp_split by hand, validated, or automatic

A stage is a contiguous slice of `model.layers`; stage 0 also runs the embedding and the last
stage the final norm, the LM head and the loss. `balance_stages` picks the slices that minimize
the heaviest stage's cost (an exact dynamic program over cut points), which is what sets the
pipeline's step time once the bubble is paid.

Stages are placed on pp ranks in a loop (stage s on rank s % pp: GPipe, 1F1B, interleaved 1F1B,
interleaved zero bubble) or in a V (two stages per rank, rank r holds stages r and 2 pp - 1 - r:
ZBV zero bubble), so the first and last stage share rank 0 in a V.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from undertow.parallel.mesh import LayoutError


@dataclasses.dataclass(frozen=True)
class StageCosts:
    """Relative costs (training FLOPs per token) of each layer and of the extras of the end stages,
    and optionally the bytes one pipeline micro-batch saves for the backward in each (see
    `with_activation_memory`)."""

    layers: list[float]
    first: float = 0.0  # embedding: a lookup and a scatter-add, no matmul; counted as 0 FLOPs
    last: float = 0.0  # final norm + LM head + cross-entropy
    memory: list[float] | None = None  # saved activation bytes per layer and micro-batch
    first_memory: float = 0.0  # the embedding's
    last_memory: float = 0.0  # the final norm's, the head's and the loss's


def stage_costs(spec, model_cfg, seq_len: int) -> StageCosts:
    """Per-layer training FLOPs per token from the family's `layer_cost`, and the LM head's
    (6 d_model vocab: forward + backward of one matmul) on the last stage. Families without a
    `layer_cost` count every layer as 1 (and the head as nothing)."""
    if spec.layer_cost is None:
        return StageCosts([1.0] * model_cfg.n_layers)
    layers = [float(c) for c in spec.layer_cost(model_cfg, seq_len)]
    return StageCosts(layers, 0.0, 6.0 * model_cfg.d_model * model_cfg.vocab_size)


def with_activation_memory(costs: StageCosts, spec, model_cfg, rows: int, seq_len: int,
                           compute_dtype: torch.dtype, checkpointed: bool = False, shards: int = 1) -> StageCosts:
    """`costs` with the activation bytes one micro-batch of `rows` x `seq_len` tokens saves in each
    layer and end stage, measured on the meta device (models/profile.py: the family's own forward,
    so every family is covered). checkpointed: each block keeps its input only (activation
    checkpointing). shards: the ranks that split a micro-batch's activations further (tp, whose
    sequence parallelism shards most of them; an estimate)."""
    from undertow.models.profile import profile_model  # a meta-device forward: only when asked

    profile = profile_model(spec.model_cls, model_cfg, compute_dtype)
    blocks = [(b.input_bytes if checkpointed else b.saved_bytes)(rows, seq_len) / shards for b in profile.blocks]
    pre, post = profile.pieces[0], profile.pieces[-1]
    return dataclasses.replace(costs, memory=blocks, first_memory=pre.saved_bytes(rows, seq_len) / shards,
                               last_memory=post.saved_bytes(rows, seq_len) / shards)


def in_flight(stage: int, n_stages: int, microbatches: int, schedule: str) -> int:
    """Micro-batches whose activations stage `stage` holds at its peak: all of them under GPipe;
    under the 1F1B family a stage runs ahead of the last by the stages after it (exact for 1F1B,
    an estimate for the interleaved and zero-bubble orders)."""
    if schedule == "gpipe":
        return microbatches
    return min(microbatches, n_stages - stage)


def _min_max_split(n: int, n_stages: int, cost) -> tuple[float, list[int]]:
    """(the smallest possible largest stage cost, layers per stage) over contiguous splits of n
    layers into n_stages non-empty stages, cost(s, j, i) being stage s holding layers [j, i). Exact:
    dynamic program over cut points, O(n_stages x n^2); ties go to the earliest cuts."""
    inf = float("inf")
    # best[s][i]: the smallest heaviest-stage cost of layers [0, i) in stages 0..s; cut[s][i]: stage s's start.
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, 0, i)
    for s in range(1, n_stages):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                value = max(best[s - 1][j], cost(s, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], n
    for s in range(n_stages - 1, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    counts.append(i)
    return best[n_stages - 1][n], counts[::-1]


def _sums(values: Sequence[float]):
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + float(v))
    return lambda j, i: prefix[i] - prefix[j]


def balance_stages(costs: Sequence[float], n_stages: int, first: float = 0.0, last: float = 0.0,
                   fits=None) -> list[int]:
    """Layers per stage (each >= 1, summing to len(costs)) that minimize the largest stage cost,
    where stage 0 also costs `first` and the last stage `last`; with `fits(s, j, i)`, only among the
    splits whose every stage s (layers [j, i)) fits. Exact (see _min_max_split)."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise LayoutError(f"{n_stages} pipeline stages cannot split {n} layers; use 1..{n} stages")
    total = _sums(costs)
    inf = float("inf")

    def cost(s: int, j: int, i: int) -> float:
        if fits is not None and not fits(s, j, i):
            return inf
        return total(j, i) + (first if s == 0 else 0.0) + (last if s == n_stages - 1 else 0.0)

    best, counts = _min_max_split(n, n_stages, cost)
    if best == inf:
        raise LayoutError(f"no split of {n} layers into {n_stages} stages fits")
    return counts


def _memory_of_stage(costs: StageCosts, n_stages: int, microbatches: int, schedule: str):
    """memory(s, j, i): peak saved-activation bytes of stage s holding layers [j, i), its in-flight
    micro-batches times its own bytes."""
    if costs.memory is None:
        raise ValueError("these stage costs carry no activation memory (see with_activation_memory)")
    total = _sums(costs.memory)

    def memory(s: int, j: int, i: int) -> float:
        own = total(j, i) + (costs.first_memory if s == 0 else 0.0) + \
            (costs.last_memory if s == n_stages - 1 else 0.0)
        return own * in_flight(s, n_stages, microbatches, schedule)

    return memory


def stage_memory(costs: StageCosts, counts: Sequence[int], microbatches: int, schedule: str) -> list[float]:
    """Peak saved-activation bytes of each stage of a split."""
    memory = _memory_of_stage(costs, len(counts), microbatches, schedule)
    return [memory(s, r.start, r.stop) for s, r in enumerate(stage_ranges(counts))]


def balance_under_memory(costs: StageCosts, n_stages: int, budget: float, microbatches: int,
                         schedule: str) -> list[int]:
    """The compute-balanced split among those whose every stage keeps at most `budget` bytes of
    saved activations at its peak (stage_memory); a LayoutError with the smallest budget any split
    needs when none does."""
    n = len(costs.layers)
    memory = _memory_of_stage(costs, n_stages, microbatches, schedule)
    try:
        return balance_stages(costs.layers, n_stages, costs.first, costs.last,
                              fits=lambda s, j, i: memory(s, j, i) <= budget)
    except LayoutError:
        if not 1 <= n_stages <= n:
            raise
        least, counts = _min_max_split(n, n_stages, memory)
        raise LayoutError(
            f"no split of {n} layers into {n_stages} stages keeps every stage's saved activations under "
            f"parallel.pp_activation_gib = {budget / 2**30:.3g}: the least any split needs is {least / 2**30:.3g} GiB "
            f"(split {counts}); raise it, add stages or turn on activation checkpointing"
        ) from None


def stage_loads(costs: StageCosts, counts: Sequence[int]) -> list[float]:
    """The cost of each stage of a split (layers + the extras of the first and last stage)."""
    loads, start = [], 0
    for s, k in enumerate(counts):
        load = sum(costs.layers[start:start + k])
        load += (costs.first if s == 0 else 0.0) + (costs.last if s == len(counts) - 1 else 0.0)
        loads.append(load)
        start += k
    return loads


def resolve_split(pp_split: Sequence[int], costs: StageCosts, n_stages: int, budget: float = 0.0,
                  microbatches: int = 1, schedule: str = "1f1b") -> list[int]:
    """Layers per stage: `parallel.pp_split` when given (validated), else `balance_stages`, under an
    activation-memory `budget` per stage (bytes; costs.memory needed) when > 0."""
    n = len(costs.layers)
    if not pp_split:
        if budget > 0:
            return balance_under_memory(costs, n_stages, budget, microbatches, schedule)
        return balance_stages(costs.layers, n_stages, costs.first, costs.last)
    split = list(pp_split)
    if len(split) != n_stages:
        raise LayoutError(
            f"parallel.pp_split = {split} has {len(split)} entries, but the pipeline has {n_stages} stages "
            "(pp x pp_virtual_stages); give one layer count per stage, or [] for the automatic split"
        )
    if any(not isinstance(k, int) or k < 1 for k in split):
        raise LayoutError(f"parallel.pp_split = {split}: every stage needs an integer >= 1 layers")
    if sum(split) != n:
        raise LayoutError(f"parallel.pp_split = {split} holds {sum(split)} layers, but the model has {n}; "
                          f"make the counts sum to {n}")
    return split


def stage_ranges(counts: Sequence[int]) -> list[range]:
    """Layer indices of each stage."""
    ranges, start = [], 0
    for k in counts:
        ranges.append(range(start, start + k))
        start += k
    return ranges


def stages_of_rank(pp_rank: int, pp: int, virtual: int, style: str) -> list[int]:
    """The stage indices pp rank `pp_rank` runs, in increasing order."""
    if style == "v":
        if virtual != 2:
            raise LayoutError(f"parallel.pp_virtual_stages = {virtual}: V-shaped schedules run exactly 2 stages per rank")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def rank_of_stage(stage: int, pp: int, style: str) -> int:
    if style == "v" and stage >= pp:
        return 2 * pp - 1 - stage
    return stage % pp
