"""The layouts expert parallelism runs in, checked without torch (the config is validated before
any process imports it)."""

from __future__ import annotations


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def expert_layout_problem(dims) -> str | None:
    """Why expert parallelism cannot run in this layout (None: it can). `dims` has the degrees as
    attributes (a ParallelDims or the config's ParallelConfig). The experts are split over ep of
    the ranks FSDP2 shards over (dp_shard x cp; parallel/expert.py), so ep must divide dp_shard x cp;
    each pipeline stage splits its own MoE layers over its ranks, and tp splits the experts' width."""
    ep = dims.ep
    if not isinstance(ep, int) or ep < 1:
        return f"parallel.ep = {ep!r}: must be an integer >= 1"
    if ep == 1:
        return None
    group = dims.dp_shard * dims.cp
    if group % ep:
        what = "parallel.dp_shard" + (" x parallel.cp" if dims.cp > 1 else "")
        valid = ", ".join(str(d) for d in _divisors(group))
        return (f"parallel.ep = {ep}: the experts are split over ep of the dp_shard x cp ranks, so ep must divide "
                f"{what} = {group}; valid ep: " + (valid if group > 1 else f"1 (or set --parallel.dp_shard {ep})"))
    return None


def expert_count_problem(dims, n_experts: int) -> str | None:
    """What parallel.ep would be valid for MoE layers of `n_experts` experts (None: this ep is).
    Every dp_shard x cp rank stores E / (dp_shard x cp) of the experts (the ep ranks of a group
    compute with E / ep each), so E must be divisible by dp_shard x cp; then every divisor of it is
    a valid ep."""
    ep, group = dims.ep, dims.dp_shard * dims.cp
    if ep == 1:
        return None
    if n_experts < 1:
        return "1 (the model has no MoE layers (model.moe.n_experts = 0): expert parallelism splits experts)"
    if n_experts % group:
        return (f"1: every one of the dp_shard x cp = {group} ranks stores model.moe.n_experts / {group} experts, and "
                f"{n_experts} experts do not split so (make dp_shard x cp a divisor of {n_experts})")
    return None
