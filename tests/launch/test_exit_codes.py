"""`undertow launch local`'s exit code (issue 13, part 6): torchrun reports every failure as 1; the
launcher passes EXIT_REQUEUE (75) on when the ranks stopped after a stop signal, so a wrapper can
tell a preemption from a crash. Stand-in ranks (a python -c one-liner) keep it to a few seconds."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launch.helpers import env
from undertow.pretrain.signals import EXIT_REQUEUE


def launcher(*rank_code: str, ranks: int = 2) -> list[str]:
    """`python -m undertow.launch.torchrun` (what `launch local` runs) with ranks running `rank_code`."""
    return [sys.executable, "-m", "undertow.launch.torchrun", "--standalone", f"--nproc-per-node={ranks}",
            "--max-restarts=0", "--no-python", sys.executable, "-c", "\n".join(rank_code)]


@pytest.mark.parametrize(("rank_code", "expected"), [
    ("raise SystemExit(75)", EXIT_REQUEUE),  # every rank checkpointed after a stop signal
    ("import os; raise SystemExit(75 if os.environ['RANK'] == '0' else 3)", 1),  # one crashed: a failure
    ("pass", 0),
])
def test_ranks_exit_code_is_passed_on(rank_code, expected):
    done = subprocess.run(launcher(rank_code), capture_output=True, text=True, env=env(), timeout=120)
    assert done.returncode == expected, done.stderr[-3000:]


def test_stop_signal_to_the_launcher_exits_75(tmp_path):
    """SIGTERM to the launcher: torchrun forwards it, the ranks (here: a handler) exit 75, and so does it."""
    rank_code = (
        "import os, signal, sys, time",
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))",
        f"open(os.path.join({str(tmp_path)!r}, os.environ['RANK']), 'w').close()",
        "time.sleep(120)",
    )
    job = subprocess.Popen(launcher(*rank_code), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env())
    try:
        deadline = time.monotonic() + 120
        while not all(os.path.exists(tmp_path / str(r)) for r in range(2)):
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() else "timeout"
            time.sleep(0.1)
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == EXIT_REQUEUE, out[-3000:]
