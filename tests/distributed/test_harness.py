"""The spawn harness itself: a rank killed by a signal is reported (with the tail of its stderr:
C++ messages and faulthandler's Python stacks) and, where allowed, run again."""

import os
import sys

import pytest

from tests.distributed.harness import run_distributed


def _abort_once(rank, world, marker):
    """Rank 1 aborts (a C++ abort's signal) the first time, while no marker exists."""
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        sys.stderr.write("rank 1 is about to abort\n")
        sys.stderr.flush()
        os.abort()
    return rank * 10


def test_a_crashed_spawn_runs_once_more_with_a_warning(tmp_path):
    with pytest.warns(RuntimeWarning, match="(?s)SIGABRT.*rank 1 stderr.*about to abort.*_abort_once.*running it once more"):
        assert run_distributed(_abort_once, 2, str(tmp_path / "first")) == [0, 10]


def test_a_crash_fails_where_the_caller_forbids_a_second_run(tmp_path):
    with pytest.raises(AssertionError, match="(?s)distributed run failed.*SIGABRT.*about to abort"):
        run_distributed(_abort_once, 2, str(tmp_path / "first"), retry_crash=False)
