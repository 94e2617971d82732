"""One writer per run directory (run_dir/.lock), and torchrun workers that end with their agent (issue 13, case 3)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.pretrain.helpers import cli_args, tiny_config
from undertow.cli import main
from undertow.pretrain import trainer as trainer_mod
from undertow.pretrain.run_lock import LOCK_NAME, RunLock, RunLockError, process_start_time
from undertow.pretrain.signals import EXIT_REQUEUE, Preempted
from undertow.pretrain.trainer import Trainer

STEPS = {"training.steps": 3}


@pytest.fixture
def other_process():
    """A live process of this host (stands for another run holding the lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_refuses_a_second_run_with_one_line_and_exit_2(tmp_path, other_process, capsys):
    run = tmp_path / "run"
    holder = {"host": socket.gethostname(), "pid": other_process.pid,
              "start_time": process_start_time(other_process.pid), "since": "2026-01-01T00:00:00+0000"}
    write_lock(run, **holder)
    assert main(["pretrain", *cli_args(run, **STEPS)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert f"pid {other_process.pid}" in errors[0] and socket.gethostname() in errors[0]
    assert "since 2026-01-01T00:00:00+0000" in errors[0] and "Traceback" not in err
    assert os.listdir(run) == [LOCK_NAME]  # nothing else written into run_dir
    assert json.loads((run / LOCK_NAME).read_text()) == holder  # and the holder's lock untouched


def test_a_lock_of_another_host_is_refused_and_says_how_to_remove_it(tmp_path):
    run = tmp_path / "run"
    write_lock(run, host="some-other-host", pid=os.getpid(), start_time=1, since="then")
    with pytest.raises(RunLockError, match=r"another host.*remove .*\.lock"):
        RunLock(str(run)).acquire()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc start times")
def test_a_reused_pid_is_a_stale_lock(tmp_path, other_process, warnings_seen):
    run = tmp_path / "run"
    write_lock(run, host=socket.gethostname(), pid=other_process.pid,
               start_time=process_start_time(other_process.pid) - 1, since="then")
    lock = RunLock(str(run)).acquire()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any(f"pid {other_process.pid} is now another process" in w for w in warnings_seen), warnings_seen
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_after_a_normal_run(tmp_path, warnings_seen):
    run = tmp_path / "run"
    pid = dead_pid()
    write_lock(run, host=socket.gethostname(), pid=pid, start_time=123, since="then")
    seen = []
    real_step = Trainer.train_step

    def step(self, micro):
        seen.append(json.loads((run / LOCK_NAME).read_text()))  # held while training
        return real_step(self, micro)

    trainer_mod.Trainer.train_step = step
    try:
        result = Trainer(tiny_config(run, training__steps=3)).fit()
    finally:
        trainer_mod.Trainer.train_step = real_step
    assert result.steps == 3
    assert any("taking over the stale lock" in w and f"pid {pid} is no longer running" in w for w in warnings_seen)
    assert seen and all(h["pid"] == os.getpid() and h["host"] == socket.gethostname() for h in seen)
    assert not (run / LOCK_NAME).exists()


def test_the_lock_is_released_after_an_exception(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def boom(self, micro):
        assert (run / LOCK_NAME).exists()
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "train_step", boom)
    t = Trainer(tiny_config(run, training__steps=3))
    with pytest.raises(RuntimeError, match="boom"):
        t.fit()
    assert not (run / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_trainer_cannot_be_built(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_maybe_resume", lambda self: (_ for _ in ()).throw(RuntimeError("no resume")))
    with pytest.raises(RuntimeError, match="no resume"):
        Trainer(tiny_config(run, training__steps=3))
    assert not (run / LOCK_NAME).exists()


def test_the_lock_is_released_after_preemption(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(trainer_mod.RunGuard, "stop_requested", lambda self: True)
    with pytest.raises(Preempted):
        Trainer(tiny_config(run, training__steps=3)).fit()
    assert not (run / LOCK_NAME).exists()
    assert main(["pretrain", *cli_args(run, **STEPS)]) == EXIT_REQUEUE  # resumes (lock free), preempted again
    assert not (run / LOCK_NAME).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_worker_gets_sigterm_when_its_agent_is_killed(tmp_path):
    marker, ready = tmp_path / "got-sigterm", tmp_path / "ready"
    worker = textwrap.dedent(f"""
        import os, signal, sys, time
        from undertow.pretrain.run_lock import exit_with_agent
        def on_term(signum, frame):
            open({str(marker)!r}, "w").write(str(os.getpid()))
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        assert exit_with_agent()
        open({str(ready)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    # the "agent": starts the worker (as torchrun would, with LOCAL_RANK) and waits
    agent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {worker!r}], env={{**os.environ, "LOCAL_RANK": "0"}})
        time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", agent], env=env)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "worker did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the worker did not get SIGTERM when its agent died"
    finally:
        proc.kill()
        proc.wait()
        if ready.exists() and not marker.exists():
            try:
                os.kill(int(ready.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_no_death_signal_outside_torchrun(monkeypatch):
    from undertow.pretrain.run_lock import exit_with_agent

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert exit_with_agent() is False
