"""A real one-node Slurm cluster for tests: slurmctld and slurmd from Debian's packages, run as
root in the foreground with all state under a temporary directory.

    with SlurmCluster(tmp_dir) as cluster:       # SLURM_CONF is exported while it runs
        job = cluster.submit(script_path)
        cluster.wait(job)

`AuthType=auth/none` + `CredType=cred/none` need no munge; `proctrack/linuxproc` and `task/none`
need no cgroups. The node is named after this machine and answers on 127.0.0.1. Teardown:
cancel every job, wait for the queue to empty, `scontrol shutdown`, then wait for (and if
needed kill, by PID) the daemons started here and any slurmstepd they left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every descendant of pid (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class SlurmCluster:
    def __init__(self, root: str, cpus: int = 8, env: dict | None = None):
        self.root = str(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.conf = os.path.join(self.root, "slurm.conf")
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**(os.environ if env is None else env), "SLURM_CONF": self.conf}  # jobs inherit sbatch's
        self._old_conf = os.environ.get("SLURM_CONF")

    # ------------------------------------------------------------- lifecycle
    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=undertowtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "KillWait=30",
            "MinJobAge=300",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        os.environ["SLURM_CONF"] = self.conf
        logs = os.path.join(self.root, "log")
        self.procs["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", self.conf], env=self.env,
            stdout=open(os.path.join(logs, "slurmctld.out"), "w"), stderr=subprocess.STDOUT,
        )
        self.procs["slurmd"] = subprocess.Popen(
            ["slurmd", "-D", "-N", self.node, "-f", self.conf], env=self.env,
            stdout=open(os.path.join(logs, "slurmd.out"), "w"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            state = self.scontrol("show", "node", self.node, check=False)
            if "State=IDLE" in state:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the Slurm node did not become idle in {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.run("scancel", "--user", "root", check=False)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and self.queue():
                    time.sleep(0.3)
                self.scontrol("shutdown", check=False)
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self._kill_leftover_stepds()
            if self._old_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._old_conf

    def _kill_leftover_stepds(self) -> None:
        """slurmstepd processes outlive `scontrol shutdown`; ours are children of our slurmd (or were
        reparented after it exited): kill those whose spool directory is ours."""
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _process_name(int(entry)) == "slurmstepd":
                pid = int(entry)
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        env = f.read()
                except OSError:
                    continue
                if self.conf.encode() in env:
                    for victim in [*descendants(pid), pid]:
                        try:
                            os.kill(victim, signal.SIGKILL)
                        except ProcessLookupError:
                            pass

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------- commands
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def scontrol(self, *args: str, check: bool = True) -> str:
        out = self.run("scontrol", *args, check=check)
        return out.stdout + out.stderr

    def queue(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i %T", check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (empty once the job is forgotten)."""
        out = self.scontrol("show", "job", "-o", job_id, check=False)
        info = {}
        for token in out.split():
            if "=" in token:
                key, value = token.split("=", 1)
                info.setdefault(key, value)
        return info

    def wait(self, job_id: str, timeout: float = 120.0, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                 "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {self.job_info(job_id).get('JobState')} after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name} (tail)\n" + "".join(f.readlines()[-30:]))
        return "\n".join(out)
