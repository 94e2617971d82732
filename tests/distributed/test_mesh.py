import pytest
import torch.distributed as dist

from tests.distributed.harness import run_distributed
from undertow.parallel.mesh import LayoutError, ParallelDims


def test_layout_errors_say_what_to_change():
    with pytest.raises(LayoutError, match=r"tp=4 does not divide n_heads=6; valid tp: 1, 2, 3, 6"):
        ParallelDims(tp=4).validate(4, [("tp", "n_heads", 6)])
    with pytest.raises(LayoutError, match="needs 4 processes, but the world size is 2"):
        ParallelDims(tp=2, dp_shard=2).validate(2)
    with pytest.raises(LayoutError, match="pp=3 exceeds layers=2"):
        ParallelDims(pp=3).validate(3, [("pp", "layers", 2)])
    with pytest.raises(LayoutError, match="must be an integer >= 1"):
        ParallelDims(cp=0)
    ParallelDims(tp=2, dp_shard=2).validate(4, [("tp", "n_heads", 6)])


def _mesh_groups(rank, world):
    mesh = ParallelDims(dp_shard=2, tp=2).build_mesh("cpu")
    groups = len(dist.distributed_c10d._world.pg_map)
    again = ParallelDims(dp_shard=2, tp=2).build_mesh("cpu")  # a second Trainer of the layout
    new_groups = len(dist.distributed_c10d._world.pg_map) - groups
    other = ParallelDims(dp_shard=4).build_mesh("cpu")
    return {"same": again is mesh, "new_groups": new_groups, "other": other is not mesh,
            **{name: dist.get_process_group_ranks(mesh[name].get_group()) for name in ("tp", "dp_shard", "dp", "dp_shard_cp")}}


def test_named_mesh_puts_tp_ranks_next_to_each_other():
    groups = run_distributed(_mesh_groups, 4)
    assert groups[0]["tp"] == [0, 1] and groups[2]["tp"] == [2, 3]
    assert groups[0]["dp_shard"] == [0, 2] and groups[1]["dp"] == [1, 3]
    assert groups[3]["dp_shard_cp"] == [1, 3]
    # one mesh per layout and process: the second build reuses the first's groups (gloo keeps three
    # threads per group alive), another layout builds its own
    assert all(g["same"] and g["other"] and g["new_groups"] == 0 for g in groups)
