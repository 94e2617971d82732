"""A collective that one rank never joins is reported with the rank and the operation, not left to hang."""

import os
import re
import signal
import subprocess
import sys

from tests.launch.helpers import DP2_ARGS, TINY_ARGS, env, wait_for_step, worker_pids

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_pair(collective_s: float, hang_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
         "-m", "tests.launch.hang_worker", str(collective_s), str(hang_s)],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_a_collective_one_rank_never_joins_fails_with_rank_and_operation():
    """The process group's timeout (training.collective_timeout_s) ends the wait; gloo's error names no
    collective, the report does."""
    job = start_pair(3, 0)
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0, out
    report = re.search(r"rank 0 \(host \S+, pid \d+\): collective all_reduce \(called from \S*hang_worker\.py:\d+ "
                       r"in main\) failed during train step of step 3 after ([\d.]+) s "
                       r"\(training\.collective_timeout_s = 3\): (.*)", out)
    assert report, out[-4000:]
    assert float(report.group(1)) >= 3 - 0.1
    assert "Timed out" in report.group(2)  # gloo's own message


def test_a_frozen_training_rank_is_reported_by_the_watchdog_of_the_other(tmp_path):
    """Two training ranks; rank 1 is frozen (SIGSTOP) mid-run. Rank 0 waits in a collective; its watchdog
    (training.hang_timeout_s, shorter than the collective timeout here) reports rank, step, phase and the
    collective, dumps the stacks and exits 124, and torchrun ends the job instead of it hanging."""
    run_dir = str(tmp_path / "run")
    job = subprocess.Popen(
        [sys.executable, "-m", "undertow.cli", "launch", "local", "tiny", *TINY_ARGS, *DP2_ARGS,
         "--training.run_dir", run_dir, "--nproc-per-node", "2", "--training.hang_timeout_s", "5",
         "--shutdown-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
    )
    try:
        wait_for_step(run_dir, 5, alive=lambda: job.poll() is None)
        os.kill(worker_pids(job.pid)[1], signal.SIGSTOP)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    report = re.search(r"rank 0 \(host \S+, pid \d+\): no progress for (\d+) s in (train step|checkpoint save) of "
                       r"step (\d+), waiting in torch\.distributed (\w+) \(called from undertow/\S+ in \w+\) "
                       r"\(training\.hang_timeout_s = 5\); stacks follow, exiting with code 124", out)
    assert report, out[-4000:]
    assert int(report.group(1)) >= 5 and int(report.group(3)) >= 5
    assert re.search(r"exitcode\s*:\s*124", out)  # torchrun's summary of the failed rank
