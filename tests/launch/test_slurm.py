"""`undertow launch slurm --submit` on a real one-node Slurm cluster: a two-process job that trains like a
local run, and a one-process job that is preempted twice (Slurm's requeue, then the time-limit signal) and
still ends with the losses of an uninterrupted run."""

import glob
import os
import re
import signal
import time

from undertow.cli import main
from undertow.pretrain import checkpoint as ckpt

from tests.launch.helpers import DP2_ARGS, STEPS, TINY_ARGS, read_losses, wait_for_step

HOSTILE = "a b $(touch p1) `touch p2`; touch p3 'q' \"dq\" #h %j"
HOSTILE_NAME = "n$(touch p4)`touch p5`;x"  # no spaces: scontrol prints it unquoted


def submit(capsys, run_dir, *args) -> str:
    assert main(["launch", "slurm", "tiny", *TINY_ARGS, "--training.run_dir", str(run_dir), *args, "--submit"]) == 0
    return capsys.readouterr().out.strip()


def rank_pids(run_dir) -> dict[int, int]:
    """rank -> pid of the training processes of the job writing to run_dir."""
    want = f"UNDERTOW_RUN_DIR={run_dir}".encode()
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if b"undertow.cli" in cmdline and b"pretrain" in cmdline and want in environ:
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0][5:])] = int(entry)
    return ranks


def wait_for(predicate, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def rank_logs(run_dir, job_id, stream: str = "stderr", rank: int = 0) -> list[str]:
    """stderr (or stdout) of a rank of each run of the job, oldest first."""
    paths = glob.glob(os.path.join(run_dir, "logs", f"slurm-{job_id}", "node0", "*", "attempt_0", str(rank),
                                   f"{stream}.log"))
    return [read(p) for p in sorted(paths, key=os.path.getmtime)]


def test_two_process_job_trains_like_a_local_run_and_hostile_values_stay_text(slurm, reference_losses_dp2,
                                                                               tmp_path, monkeypatch, capsys):
    """Two CPU processes (FSDP) in one Slurm job, its run directory, job name and an exported value full of
    shell syntax: the job runs, its log, rank logs and checkpoints are where the script says, and its losses
    are those of `undertow launch local` with the same config."""
    cwd = tmp_path / "cwd"  # the job's working directory: a hostile value evaluated anywhere would touch files here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = str(tmp_path / HOSTILE)
    job_id = submit(capsys, run_dir, *DP2_ARGS, "--nproc-per-node", "2", "--cpus-per-task", "2",
                    "--job-name", HOSTILE_NAME, "--env", f"PROBE={HOSTILE}", "--partition", "debug")
    info = slurm.wait(job_id, timeout=300)
    log = os.path.join(run_dir, "logs", f"slurm-{job_id}.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", read(log)[-3000:]
    assert os.listdir(cwd) == [], "a hostile value was executed"
    shown = slurm.scontrol("show", "job", "-o", job_id)
    assert re.search(r"JobName=(.*?) UserId=", shown).group(1) == HOSTILE_NAME
    assert "undertow: training finished" in read(log)
    for rank in (0, 1):
        (stderr,) = rank_logs(run_dir, job_id, rank=rank)
        assert "layout dp_shard2 (2 processes)" in stderr
    (stdout,) = rank_logs(run_dir, job_id, "stdout")
    assert f"done: {STEPS} steps" in stdout
    assert ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints")).endswith(f"step_{STEPS:08d}")
    assert read_losses(run_dir) == reference_losses_dp2


def test_preempted_job_requeues_and_resumes_to_the_uninterrupted_losses(slurm, reference_losses, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = str(tmp_path / "run")
    job_id = submit(capsys, run_dir)
    log = os.path.join(run_dir, "logs", f"slurm-{job_id}.out")

    def state():
        return slurm.job_info(job_id).get("JobState")

    def release_after_requeue(restarts: int):
        """A requeued job waits ~2 minutes (Slurm's BeginTime); let it start now. Not in the second
        its last run was killed: slurmd revokes the job's credential at the kill, with one-second
        resolution, and refuses a relaunch in that second ("Job credential revoked": the job FAILS)."""
        wait_for(lambda: state() == "PENDING" and slurm.job_info(job_id).get("Restarts") == str(restarts),
                 f"job {job_id} requeued ({restarts})")
        time.sleep(2.0)
        slurm.scontrol("update", f"jobid={job_id}", "StartTime=now")

    # 1. Slurm requeues the running job (as preemption does): SIGTERM to every process of the job. The rank
    #    is paused first so that the signal lands mid-run whatever the machine's speed; Slurm sends SIGCONT
    #    before SIGTERM.
    wait_for_step(run_dir, 12, alive=lambda: state() in ("PENDING", "RUNNING"))
    pids = rank_pids(run_dir)
    os.kill(pids[0], signal.SIGSTOP)
    slurm.scontrol("requeue", job_id)
    release_after_requeue(1)

    # 2. The time limit nears: Slurm sends SIGUSR1 to the batch shell (--signal=B:USR1@...), which passes it to
    #    the job's steps, lets the ranks checkpoint and requeues the job itself.
    wait_for(lambda: state() == "RUNNING" and len(rank_logs(run_dir, job_id)) == 2, "the second run")
    wait_for_step(run_dir, 30, alive=lambda: state() in ("PENDING", "RUNNING"))
    pids = wait_for(lambda: rank_pids(run_dir), "the second run's rank")
    os.kill(pids[0], signal.SIGSTOP)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(lambda: "closing signal SIGUSR1" in read(log).split("restart 1")[-1], "torchrun passing SIGUSR1 on")
    os.kill(pids[0], signal.SIGCONT)
    release_after_requeue(2)

    info = slurm.wait(job_id, timeout=300)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    for expected in ("restart 1", "restart 2", "SIGTERM (preemption", "SIGUSR1 (time limit near)",
                     "requeueing job", "training finished"):
        assert expected in text, expected
    first, second, third = rank_logs(run_dir, job_id)
    stop1 = int(re.search(r"stopped: SIGTERM received: stopped after step (\d+)", first).group(1))
    stop2 = int(re.search(r"stopped: SIGUSR1 received: stopped after step (\d+)", second).group(1))
    assert 12 <= stop1 < 30 <= stop2 < STEPS
    assert f"resumed from {run_dir}/checkpoints/step_{stop1:08d} at step {stop1}" in second  # the signal's checkpoint
    assert f"resumed from {run_dir}/checkpoints/step_{stop2:08d} at step {stop2}" in third
    assert read_losses(run_dir) == reference_losses  # every step, bit for bit
