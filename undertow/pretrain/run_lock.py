"""One writer per run directory, and workers that end when their torchrun agent dies.

`RunLock` is taken by rank 0 before anything is written into `training.run_dir`: the file
`run_dir/.lock` holds the holder's host, pid, process start time and since when (JSON), created
with O_CREAT|O_EXCL so only one process can create it. A second run on the same directory while
the holder lives is refused with one line naming it. A lock left by a dead process of this host (its
pid gone, or reused by another process: the start time in /proc/<pid>/stat differs) is taken over
with a warning. A lock of another host is refused: this host cannot tell whether that process lives;
the message says to remove the file if that host's run is gone. The lock is released on every exit
path of the run (normal end, exception, preemption).

`exit_with_agent()`: a torchrun worker asks the kernel for SIGTERM when its parent (the agent) dies,
so a SIGKILLed agent does not leave workers training beside a restarted job. SIGTERM goes through
the RunGuard (checkpoint, exit 75) once training runs; before that it ends the process.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time

from undertow.log import get_logger

log = get_logger("undertow.run_lock")

LOCK_NAME = ".lock"
PR_SET_PDEATHSIG = 1
_TAKEOVER_STALE_S = 30.0  # a takeover marker older than this was left by a process that died in it
_UNREADABLE_GRACE_S = 10.0  # an unreadable lock younger than this may be being written


class RunLockError(RuntimeError):
    """Another run holds the run directory (one line, naming the holder)."""


def process_start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22); None when
    there is no such process or this is not Linux."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    try:  # the command name (field 2) is in parentheses and may hold spaces or ')'
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_time": process_start_time(pid),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(h: dict) -> str:
    return f"host {h.get('host')}, pid {h.get('pid')}, since {h.get('since')}"


class RunLock:
    """`run_dir/.lock` for the lifetime of a run. `acquire()` raises RunLockError when it is held;
    `release()` (or leaving the `with` block) removes it if it is still this process's."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.held: dict | None = None

    # ------------------------------------------------------------ public
    def acquire(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(3):
            if self._create():
                return self
            current = self._read()
            reason = self._stale_reason(current)
            if reason is None:
                raise self._refusal(current)
            if self._take_over(current, reason):
                return self
        raise RunLockError(f"{self.run_dir} is locked by another run ({self.path} keeps changing); try again")

    def release(self) -> None:
        if self.held is None:
            return
        try:
            if self._read() == self.held:  # never remove a lock that was taken over from us
                os.remove(self.path)
        except OSError:
            pass
        self.held = None

    def __enter__(self) -> "RunLock":
        if self.held is None:
            self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    # ------------------------------------------------------------ internals
    def _create(self) -> bool:
        holder = _holder()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
            f.flush()
            os.fsync(f.fileno())
        self.held = holder
        return True

    def _read(self) -> dict | None:
        """The lock's content; {} when it exists but is unreadable; None when it is gone."""
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale_reason(self, h: dict | None) -> str | None:
        """Why lock content `h` belongs to no living run, or None when it may (refuse)."""
        if h is None:
            return "it was removed"
        if not h:
            try:
                age = time.time() - os.path.getmtime(self.path)
            except OSError:
                return "it was removed"
            return "it is unreadable" if age > _UNREADABLE_GRACE_S else None
        if h.get("host") != socket.gethostname():
            return None
        pid = h.get("pid")
        if not isinstance(pid, int):
            return "it names no pid"
        if pid == os.getpid() and h.get("start_time") == process_start_time(pid):
            return "this process holds it (an earlier run in this process that did not finish)"
        if not pid_alive(pid):
            return f"pid {pid} is no longer running"
        start = process_start_time(pid)
        if start is not None and h.get("start_time") is not None and start != h.get("start_time"):
            return f"pid {pid} is now another process"
        return None

    def _refusal(self, h: dict | None) -> RunLockError:
        if not h:
            return RunLockError(f"{self.run_dir} is being locked by another run ({self.path} is being written); "
                                f"if no run is starting there, remove {self.path}")
        if h.get("host") != socket.gethostname():
            return RunLockError(
                f"{self.run_dir} is in use by another run ({_describe(h)}); it runs on another host, so this one "
                f"cannot tell whether it is alive: if that run is gone, remove {self.path} and start again")
        return RunLockError(f"{self.run_dir} is in use by another run ({_describe(h)}); stop it or choose another "
                            "training.run_dir")

    def _take_over(self, seen: dict | None, reason: str) -> bool:
        """Replace the stale lock `seen`, under a marker file so two starters cannot both take it."""
        marker = self.path + ".takeover"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(marker) > _TAKEOVER_STALE_S:
                    os.remove(marker)
            except OSError:
                pass
            time.sleep(0.1)
            return False
        os.close(fd)
        try:
            if self._read() != seen:  # changed since we judged it: judge again
                return False
            if seen is not None:
                os.remove(self.path)
                if "this process holds it" not in reason:
                    log.warning("%s: taking over the stale lock of %s (%s)", self.run_dir,
                                _describe(seen) if seen else "an unknown run", reason)
            return self._create()
        finally:
            try:
                os.remove(marker)
            except OSError:
                pass


def lock_run_dir(run_dir: str, lead: bool) -> RunLock | None:
    """Rank 0 takes `run_dir`'s lock; every rank raises RunLockError when it is held. Collective when
    distributed (all ranks agree, so none goes on alone)."""
    from undertow.pretrain.checkpoint_manifest import from_all_ranks

    lock, failure = None, None
    if lead:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockError as e:
            failure = str(e)
        except OSError as e:  # an unwritable run_dir: the preflight that follows says so on every rank
            log.debug("run directory lock not taken: %s", e)
    failures = [f for f in from_all_ranks([failure]) if f is not None]
    if failures:
        if lock is not None:
            lock.release()
        raise RunLockError(failures[0])
    return lock


# ---------------------------------------------------------------- workers end with their agent
def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def exit_with_agent(sig: int = signal.SIGTERM) -> bool:
    """Under torchrun on Linux: have the kernel send `sig` to this worker when its parent (the agent)
    dies; if it died already (before the request took effect), send it now. True when set up."""
    if not sys.platform.startswith("linux") or not launched_by_torchrun():
        return False
    return set_parent_death_signal(sig)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig), then check the parent did not die before it took effect (the
    worker would then have been re-parented to init or a subreaper: getppid() changed)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); workers may outlive their agent", ctypes.get_errno())
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        log.warning("the torchrun agent (parent pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), sig)
    return True
