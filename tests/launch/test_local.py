"""`undertow launch local`: two ranks under torchrun; one rank stopped by a signal, later one killed; all
ranks restart from the newest checkpoint and the run ends with the losses of an uninterrupted one."""

import glob
import os
import re
import signal
import subprocess
import sys

from tests.launch.helpers import DP2_ARGS, STEPS, TINY_ARGS, env, read_losses, wait_for_step, worker_pids


def attempt_log(run_dir, attempt: int, rank: int) -> str:
    (path,) = glob.glob(os.path.join(run_dir, "logs", "local", "*", f"attempt_{attempt}", str(rank), "stderr.log"))
    with open(path) as f:
        return f.read()


def test_stopped_then_killed_rank_restarts_all_ranks_to_the_uninterrupted_losses(tmp_path, reference_losses_dp2):
    run_dir = str(tmp_path / "run")
    job = subprocess.Popen(
        [sys.executable, "-m", "undertow.cli", "launch", "local", "tiny", *TINY_ARGS, *DP2_ARGS,
         "--training.run_dir", run_dir, "--nproc-per-node", "2", "--max-restarts", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
    )
    alive = lambda: job.poll() is None  # noqa: E731
    try:
        # 1. SIGTERM to rank 1 only: the ranks agree to stop after the same step, checkpoint it together and
        #    exit 75; torchrun restarts both, which resume from that checkpoint.
        wait_for_step(run_dir, 12, alive)
        ranks = worker_pids(job.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)
        # 2. SIGKILL of rank 1 in the second attempt: restarted again, from the newest checkpoint.
        wait_for_step(run_dir, 32, alive)
        ranks = worker_pids(job.pid)
        os.kill(ranks[1], signal.SIGKILL)
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    first = attempt_log(run_dir, 0, 0) + attempt_log(run_dir, 0, 1)
    stops = re.findall(r"stopped: (.*?) received: stopped after step (\d+)", first)
    assert len(stops) == 2 and {s for s, _ in stops} == {"SIGTERM", "a stop signal on another rank"}, stops
    assert stops[0][1] == stops[1][1]  # both ranks stopped after the same step
    stop = int(stops[0][1])
    assert 12 <= stop < 32
    assert f"step_{stop:08d} at step {stop}" in attempt_log(run_dir, 1, 0)
    assert "resumed from" in attempt_log(run_dir, 2, 0)
    assert read_losses(run_dir) == reference_losses_dp2  # every step, bit for bit
    assert max(read_losses(run_dir)) == STEPS
