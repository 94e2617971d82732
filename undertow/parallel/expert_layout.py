"""The layouts expert parallelism runs in, checked without torch (the config is validated before
any process imports it)."""

from __future__ import annotations


def expert_layout_problem(dims) -> str | None:
    """Why expert parallelism cannot run in this layout (None: it can). `dims` has the degrees as
    attributes (a ParallelDims or the config's ParallelConfig). The experts are split over the ranks
    FSDP2 shards over (dp_shard x cp, one dimension of its mesh), so ep must be dp_shard x cp; under
    tp every tp rank computes the whole MoE layer (the experts replicated over tp). Splitting them
    inside pipeline stages, or over part of the dp_shard ranks, is not built yet."""
    ep = dims.ep
    if not isinstance(ep, int) or ep < 1:
        return f"parallel.ep = {ep!r}: must be an integer >= 1"
    if ep == 1:
        return None
    group = dims.dp_shard * dims.cp
    if ep != group:
        what = "parallel.dp_shard" + (" x parallel.cp" if dims.cp > 1 else "")
        return (f"parallel.ep = {ep}: the experts are split over the dp_shard x cp ranks, so ep must equal "
                f"{what} = {group}; valid ep: "
                + (f"1 or {group}" if group > 1 else f"1 (or set --parallel.dp_shard {ep})"))
    if dims.pp > 1:
        return (f"parallel.ep = {ep} with parallel.pp = {dims.pp}: expert parallelism runs with pp = 1 in this "
                f"version; valid ep here: 1")
    return None
