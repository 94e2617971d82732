import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from tests.distributed.harness import run_distributed
from undertow.parallel.comm_count import count_collectives


def _collectives(rank, world):
    group = dist.group.WORLD
    with count_collectives() as counts:
        dist.all_reduce(torch.ones(100))  # 400 bytes in
        out = torch.empty(2 * 10)
        dist.all_gather_into_tensor(out, torch.full((10,), float(rank)))  # 40 bytes in
        funcol.all_reduce(torch.ones(8, dtype=torch.float64), "sum", group)  # 64 bytes in
    dist.all_reduce(torch.ones(1000))  # outside the block: not counted
    return dict(counts.bytes), dict(counts.calls), out.tolist()


def test_counts_payload_bytes_per_collective_and_restores_the_originals():
    for bytes_, calls, gathered in run_distributed(_collectives, 2):
        assert bytes_ == {"all_reduce": 400, "all_gather_into_tensor": 40, "functional.all_reduce": 64}
        assert calls == {"all_reduce": 1, "all_gather_into_tensor": 1, "functional.all_reduce": 1}
        assert gathered == [0.0] * 10 + [1.0] * 10  # the patched collectives still work
