"""A two-rank job (run under torchrun) in which rank 1 never joins rank 0's all_reduce.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.launch.hang_worker COLLECTIVE_S HANG_S

Rank 0 waits in the all_reduce inside the trainer's RunGuard, at "train step" 3: the process
group's timeout (COLLECTIVE_S) or the hang watchdog (HANG_S, 0: off) must end the wait with a
report. Rank 1 sleeps, as a rank stuck elsewhere would, until torchrun ends it.
"""

import sys
import time
import types

import torch
import torch.distributed as dist

from undertow.pretrain.signals import RunGuard, collective_timeout


def main() -> None:
    collective_s, hang_s = float(sys.argv[1]), float(sys.argv[2])
    dist.init_process_group("gloo", timeout=collective_timeout(collective_s))
    if dist.get_rank() != 0:
        time.sleep(600)
        return
    training = types.SimpleNamespace(collective_timeout_s=collective_s, hang_timeout_s=hang_s)
    with RunGuard(training, torch.device("cpu")) as guard:
        guard.beat("train step", 3)
        dist.all_reduce(torch.ones(4))


if __name__ == "__main__":
    main()
