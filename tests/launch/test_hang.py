"""A collective that one rank never joins is reported with the rank and the operation, not left to hang."""

import os
import re
import subprocess
import sys

from tests.launch.helpers import env

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
