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


def test_collective_timeout_and_watchdog_name_rank_and_operation():
    # Both jobs run at once (they mostly wait). In the first the process group's timeout fires; in the second
    # it is long and the watchdog fires instead.
    by_timeout, by_watchdog = start_pair(3, 0), start_pair(600, 3)
    out_timeout, _ = by_timeout.communicate(timeout=300)
    out_watchdog, _ = by_watchdog.communicate(timeout=300)

    assert by_timeout.returncode != 0, out_timeout
    report = re.search(r"rank 0 \(host \S+, pid \d+\): collective all_reduce \(called from \S*hang_worker\.py:\d+ "
                       r"in main\) failed during train step of step 3 after ([\d.]+) s "
                       r"\(training\.collective_timeout_s = 3\): (.*)", out_timeout)
    assert report, out_timeout[-4000:]
    assert float(report.group(1)) >= 3 - 0.1
    assert "Timed out" in report.group(2)  # gloo's own message, which names no collective

    assert by_watchdog.returncode != 0, out_watchdog
    report = re.search(r"rank 0 \(host \S+, pid \d+\): no progress for (\d+) s in train step of step 3, waiting in "
                       r"torch\.distributed all_reduce \(called from \S*hang_worker\.py:\d+ in main\) "
                       r"\(training\.hang_timeout_s = 3\); stacks follow, exiting with code 124", out_watchdog)
    assert report, out_watchdog[-4000:]
    assert int(report.group(1)) >= 3
    assert "Current thread" in out_watchdog or "Thread 0x" in out_watchdog  # faulthandler's stacks
    assert re.search(r"exitcode\s*:\s*124", out_watchdog)  # torchrun's summary of the failed rank


def test_a_rank_that_stops_answering_is_reported_by_the_other(tmp_path):
    """Two training ranks; rank 1 is frozen (SIGSTOP) mid-run. Rank 0 waits in a collective until
    training.collective_timeout_s, reports rank, operation, step and phase, and the job ends."""
    run_dir = str(tmp_path / "run")
    job = subprocess.Popen(
        [sys.executable, "-m", "undertow.cli", "launch", "local", "tiny", *TINY_ARGS, *DP2_ARGS,
         "--training.run_dir", run_dir, "--nproc-per-node", "2", "--training.collective_timeout_s", "10",
         "--shutdown-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
    )
    try:
        wait_for_step(run_dir, 5, alive=lambda: job.poll() is None)
        frozen = worker_pids(job.pid)[1]
        os.kill(frozen, signal.SIGSTOP)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    report = re.search(r"rank 0 \(host \S+, pid \d+\): collective (\w+) \(called from (undertow/\S+) in \w+\) failed "
                       r"during (train step|checkpoint save|validation) of step (\d+) after ([\d.]+) s "
                       r"\(training\.collective_timeout_s = 10\)", out)
    assert report, out[-4000:]
    assert int(report.group(4)) >= 5 and float(report.group(5)) >= 10 - 0.1
