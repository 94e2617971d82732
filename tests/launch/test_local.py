"""`undertow launch local`: torchrun on this machine, restarts after a rank is killed."""

import glob
import os
import signal
import subprocess
import sys

from tests.launch.helpers import TINY_ARGS, env, read_losses, wait_for_step
from tests.launch.slurm_cluster import descendants


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes under a torchrun."""
    ranks = {}
    for pid in descendants(torchrun_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"undertow.cli" in cmdline and b"RANK" in environ:
            ranks[int(environ[b"RANK"])] = pid
    return ranks


def test_torchrun_restarts_the_ranks_after_one_is_killed(tmp_path, reference_losses):
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "undertow.cli", "launch", "local", "tiny", *TINY_ARGS,
         "--training.run_dir", str(run_dir), "--nproc-per-node", "1", "--max-restarts", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
    )
    try:
        wait_for_step(run_dir, 12, alive=lambda: job.poll() is None)  # past the checkpoint of step 10
        ranks = worker_pids(job.pid)
        assert list(ranks) == [0], ranks
        os.kill(ranks[0], signal.SIGKILL)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    assert read_losses(run_dir) == reference_losses  # every step, bit for bit, as one uninterrupted run
    # torchrun kept each attempt's rank logs; the second attempt resumed from the checkpoint
    (second,) = glob.glob(str(run_dir / "logs" / "local" / "*" / "attempt_1" / "0" / "stderr.log"))
    with open(second) as f:
        assert "resumed from" in f.read()
