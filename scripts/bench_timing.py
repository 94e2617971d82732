"""The CPU bench scripts' timing: the median of timed runs after one warm-up, and the line that says
where a table was measured.

    from bench_timing import median_seconds   # scripts/ is on sys.path when a script runs

One place for it, so every scripts/bench_*_cpu.py table means the same thing by "median of
--trials after a warm-up".
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from typing import Callable


def median_seconds(step: Callable[[], object], trials: int, *, clock: Callable[[], float] = time.perf_counter,
                   long_warm_up: float | None = None) -> float:
    """Median of `trials` timed calls of step() after one untimed warm-up call.

    clock: time.perf_counter (wall time) or time.thread_time (CPU time of the calling thread, which
    leaves out the time a process waits for a core on a shared machine).
    long_warm_up: if set and the warm-up takes longer than this many seconds, the warm-up's time is
    returned without further calls (a reference loop's minute-long backward is dominated by
    steady-state work, so one call is the measurement).
    """
    start = clock()
    step()
    warm_up = clock() - start
    if long_warm_up is not None and warm_up > long_warm_up:
        return warm_up
    seconds = []
    for _ in range(trials):
        start = clock()
        step()
        seconds.append(clock() - start)
    return statistics.median(seconds)


def provenance(threads: int) -> str:
    """The line above a table for docs/benchmarks.md: the command as run, the machine, torch threads,
    torch version and date, ending in a newline (printed, a blank line before the table)."""
    import torch  # here, so the timing alone needs no torch

    return (f"`python {' '.join(sys.argv)}` — {platform.processor() or platform.machine()}, "
            f"{threads} thread(s), torch {torch.__version__}, {datetime.date.today()}\n")
