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
        peer = 1 - rank  # as the pipeline schedules exchange activations: 12 bytes sent, one receive
        received = torch.zeros(3)
        ops = [dist.P2POp(dist.isend, torch.full((3,), float(rank)), peer), dist.P2POp(dist.irecv, received, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    dist.all_reduce(torch.ones(1000))  # outside the block: not counted
    return dict(counts.bytes), dict(counts.calls), out.tolist() + received.tolist()


def test_counts_payload_bytes_per_collective_and_restores_the_originals():
    for rank, (bytes_, calls, gathered) in enumerate(run_distributed(_collectives, 2)):
        assert bytes_ == {"all_reduce": 400, "all_gather_into_tensor": 40, "functional.all_reduce": 64, "p2p_send": 12}
        assert calls == {"all_reduce": 1, "all_gather_into_tensor": 1, "functional.all_reduce": 1, "p2p_send": 1}
        assert gathered == [0.0] * 10 + [1.0] * 10 + [float(1 - rank)] * 3  # the patched calls still work
