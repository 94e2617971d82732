"""Preemption, hangs and failed collectives, as the training loop sees them.

`RunGuard` wraps the step loop of the trainer:

    with RunGuard(cfg.training, device) as guard:
        while step < steps:
            guard.beat("train step", step + 1)        # what this rank is doing now
            ...
            if step < steps and guard.stop_requested():  # every step, on every rank
                raise guard.preempted(step, save())

- SIGTERM / SIGUSR1 (Slurm preemption, `scontrol requeue`, the time-limit warning of
  `--signal=...USR1@T`, torchrun shutting its workers down) only set a flag: the rank finishes
  the step it is in, all ranks agree (one max all-reduce per step) so they stop at the same
  step, a checkpoint is written and `undertow pretrain` exits with EXIT_REQUEUE. The next start
  (`checkpoint.resume = auto`) continues from that checkpoint.
- SIGINT (Ctrl-C) does the same; a second Ctrl-C exits at once (KeyboardInterrupt). A second SIGINT
  within REPEAT_WINDOW_S of the first is the same Ctrl-C arriving twice (the terminal sends it to
  every process of the job, and torchrun forwards its own copy to its ranks), so it is not counted.
- A watchdog thread reports a rank that stays in one phase longer than
  `training.hang_timeout_s` (rank, host, pid, step, phase and the torch.distributed call the
  main thread waits in, then every thread's stack) and ends the process with EXIT_HUNG, so
  torchrun restarts the job or it ends, instead of hanging forever.
- A collective that fails (gloo/NCCL raise after `training.collective_timeout_s` when a rank
  never joins) is logged with the rank, the operation (found in the traceback: gloo's own
  message names only "recv"/"send"), the step and the phase before the error propagates.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from undertow.log import get_logger

log = get_logger("undertow.launch")

EXIT_REQUEUE = 75  # "temporary failure, try again" (sysexits EX_TEMPFAIL): checkpointed after a stop signal
EXIT_HUNG = 124  # the hang watchdog fired (as coreutils' timeout)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW_S = 1.0  # a SIGINT this soon after the first stop signal is the same Ctrl-C (see above)
_DIST_DIR = os.path.dirname(dist.__file__) + os.sep
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class Preempted(Exception):
    """The run stopped after a stop signal, with a checkpoint of the step it stopped at."""

    def __init__(self, step: int, signal_name: str, checkpoint: str | None):
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        super().__init__(
            f"{signal_name} received: stopped after step {step} with checkpoint {checkpoint}; the same command "
            f"continues from it (checkpoint.resume = auto); exit code {EXIT_REQUEUE} asks for a requeue"
        )


def collective_timeout(seconds: float) -> timedelta:
    """`training.collective_timeout_s` as the `timeout` of `init_process_group`."""
    return timedelta(seconds=seconds)


def apply_collective_timeout(seconds: float, mesh=None) -> None:
    """Give the default process group and every group of `mesh` (its dimensions and flattened
    dimensions) `training.collective_timeout_s`. DeviceMesh builds its groups with torch's default
    timeout (10 min NCCL, 30 min gloo), not the one init_process_group was given, so they are set
    here, after the mesh exists (torchtitan does the same through `_set_pg_timeout`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    groups = {id(dist.group.WORLD): dist.group.WORLD}
    if mesh is not None:
        meshes = [mesh, *getattr(mesh, "_flatten_mapping", {}).values()]
        for m in meshes:
            for group in m.get_all_groups():
                groups[id(group)] = group
    for group in groups.values():
        dist.distributed_c10d._set_pg_timeout(collective_timeout(seconds), group)


def this_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _where() -> str:
    return f"rank {this_rank()} (host {socket.gethostname()}, pid {os.getpid()})"


def describe_call(frames: list[FrameType]) -> str | None:
    """'all_reduce (called from undertow/pretrain/trainer.py:211 in train_step)' for a stack whose
    innermost torch.distributed frame is all_reduce; None when no torch.distributed frame is on it.

    `frames` run outermost first. The operation is the innermost public torch.distributed function
    (decorator wrappers and private helpers are skipped); the caller is the innermost frame outside
    torch, i.e. the line of our code that started it.
    """
    op, caller = None, None
    for frame in frames:
        code = frame.f_code
        path = code.co_filename
        if path.startswith(_DIST_DIR):
            if not code.co_name.startswith("_") and code.co_name != "wrapper":
                op = code.co_name
        elif not path.startswith(_TORCH_DIR) and op is None:
            caller = f"{_short(path)}:{frame.f_lineno} in {code.co_name}"
    if op is None:
        return None
    return f"{op} (called from {caller})" if caller else op


def _short(path: str) -> str:
    parts = path.split(os.sep)
    if "undertow" in parts:
        return os.sep.join(parts[len(parts) - 1 - parts[::-1].index("undertow"):])
    return path


def traceback_frames(tb: TracebackType | None) -> list[FrameType]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def thread_frames(thread_id: int) -> list[FrameType]:
    frame = sys._current_frames().get(thread_id)
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames[::-1]


class RunGuard:
    """Stop signals, the hang watchdog and collective-failure reports around a training loop."""

    def __init__(self, training, device: torch.device):
        self.hang_timeout_s = float(training.hang_timeout_s)
        self.collective_timeout_s = float(training.collective_timeout_s)
        self.device = device
        self.signal_name: str | None = None
        self._signalled_at = 0.0
        self._announced = False
        self._previous: dict[int, object] = {}
        self._phase = ("starting", 0, time.monotonic())
        self._main_thread = threading.main_thread().ident
        self._done = threading.Event()
        self._watchdog: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RunGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.hang_timeout_s > 0:
            self._watchdog = threading.Thread(target=self._watch, name="undertow-hang-watchdog", daemon=True)
            self._watchdog.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if exc is not None and not isinstance(exc, (Preempted, KeyboardInterrupt)):
            call = describe_call(traceback_frames(tb))
            if call is not None:
                phase, step, since = self._phase
                log.error(
                    "%s: collective %s failed during %s of step %d after %.1f s (training.collective_timeout_s = "
                    "%g): %s", _where(), call, phase, step, time.monotonic() - since, self.collective_timeout_s,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
                )
        return False

    # ------------------------------------------------------------ the loop's calls
    def beat(self, phase: str, step: int) -> None:
        """This rank starts `phase` of `step`; the watchdog measures from here."""
        self._phase = (phase, step, time.monotonic())

    def stop_requested(self) -> bool:
        """True on every rank once any rank got a stop signal. A collective when distributed: call it at
        the same point of every step on every rank."""
        local = self.signal_name is not None
        if local and not self._announced:
            self._announced = True
            log.warning("%s: %s received; checkpointing after step %d, then exiting with code %d%s",
                        _where(), self.signal_name, self._phase[1], EXIT_REQUEUE,
                        " (Ctrl-C again to exit at once, without it)" if self.signal_name == "SIGINT" else "")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if bool(flag.item()) and self.signal_name is None:
                self.signal_name = "a stop signal on another rank"
            return bool(flag.item())
        return local

    def preempted(self, step: int, checkpoint: str | None) -> Preempted:
        return Preempted(step, self.signal_name or "stop signal", checkpoint)

    # ------------------------------------------------------------ internals
    def _on_signal(self, signum: int, frame) -> None:
        # Only set the flag: logging here could re-enter a stream the main thread is writing.
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._signalled_at = signal.Signals(signum).name, now
        elif signum == signal.SIGINT and now - self._signalled_at > REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, no checkpoint

    def _watch(self) -> None:
        poll = min(1.0, max(self.hang_timeout_s / 20, 0.05))
        while not self._done.wait(poll):
            phase, step, since = self._phase
            stuck = time.monotonic() - since
            if stuck < self.hang_timeout_s:
                continue
            call = describe_call(thread_frames(self._main_thread))
            log.error(
                "%s: no progress for %.0f s in %s of step %d%s (training.hang_timeout_s = %g); stacks follow, "
                "exiting with code %d", _where(), stuck, phase, step,
                f", waiting in torch.distributed {call}" if call else "", self.hang_timeout_s, EXIT_HUNG,
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(EXIT_HUNG)
