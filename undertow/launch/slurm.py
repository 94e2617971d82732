"""The sbatch script of `undertow launch slurm`: one srun task per node, each running torchrun.

What the script does, in order:

- `#SBATCH` lines: nodes, one task per node, GPUs/CPUs, partition and the like, the log file
  `RUN_DIR/logs/slurm-<job id>.out` (appended to across requeues), `--requeue`, and
  `--signal=B:USR1@T`: T seconds before the time limit Slurm sends SIGUSR1 to the batch shell
  only (B:), never straight to torchrun (which SIGUSR1 would kill without the workers saving).
- The environment: `--env-setup` lines as written (they are shell code by intent: `module load`,
  `source venv/bin/activate`), exports of `--env KEY=VALUE` (quoted), thread and NCCL settings.
- The rendezvous: torchrun's c10d store on the first node's address (its Slurm NodeAddr) and a
  port derived from the job id, the job id as rendezvous id.
- srun starts torchrun on every node, rank logs in `RUN_DIR/logs/slurm-<job>/node<N>/`.
- On SIGUSR1 the shell passes SIGUSR1 to the job's steps (`scancel --signal=USR1`): torchrun
  forwards it to the workers, which finish their step, checkpoint and stop. When the training then
  ends unfinished, or exits with EXIT_REQUEUE, the shell runs `scontrol requeue` on its own job;
  the requeued job runs this script again and `checkpoint.resume = auto` continues from the
  checkpoint. SIGTERM (preemption, `scontrol requeue`, scancel) reaches every process from
  Slurm itself; the workers checkpoint the same way and Slurm requeues or ends the job as it
  decided.

Every value that comes from the user (config values, paths, options) is shell-quoted in the body
and escaped for sbatch's own parser in `#SBATCH` lines; nothing of it is ever evaluated as code,
except `--env-setup`, whose purpose is to be run. Line breaks cannot be written in an `#SBATCH`
line, so they are refused there.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field

from undertow import __version__
from undertow.configtools import ConfigError
from undertow.launch.command import PretrainCommand
from undertow.pretrain.signals import EXIT_REQUEUE
from undertow.launch.torchrun import TORCHRUN_ENV, node_options

_DIRECTIVE_SAFE = re.compile(r"[A-Za-z0-9_.,:@+=/%\[\]-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PORT_BASE, PORT_SPAN = 10000, 20000  # rendezvous port: PORT_BASE + job id % PORT_SPAN, below the ephemeral ports


@dataclass
class SlurmJob:
    """Resources and settings of the job; None leaves a setting to the cluster's defaults."""

    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU nodes
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str | None = None
    container_image: str | None = None
    container_mounts: str | None = None
    env_setup: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)  # KEY=VALUE
    signal_before_s: int = 120
    max_restarts: int = 0
    python: str | None = None  # default: `python3` in a container, else the interpreter running undertow

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    def validate(self) -> None:
        for name in ("nodes", "nproc_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} = {value}: must be >= 1")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node = {self.gpus_per_node}: must be >= 0 (0: CPU nodes, gloo)")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts = {self.max_restarts}: must be >= 0")
        if self.signal_before_s < 1:
            raise ConfigError(f"--signal-before = {self.signal_before_s}: must be >= 1 second")
        for item in self.env:
            key = item.split("=", 1)[0]
            if "=" not in item or not _ENV_NAME.fullmatch(key):
                raise ConfigError(f"--env {item!r}: give KEY=VALUE with KEY a shell variable name")


def directive(option: str, value: object = None) -> str:
    """One `#SBATCH --option=value` line that sbatch reads back as exactly `value`.

    sbatch splits these lines itself (no shell): quotes group, a backslash escapes the next
    character and an unquoted `#` ends the line. Plain values are written as they are, others in
    double quotes with `\\` and `"` escaped. A line break cannot be written, so it is refused."""
    if value is None:
        return f"#SBATCH --{option}"
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ConfigError(f"--{option} = {text!r}: control characters and line breaks cannot be written in an #SBATCH line")
    if not _DIRECTIVE_SAFE.fullmatch(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH --{option}={text}"


def log_pattern(run_dir: str) -> str:
    """RUN_DIR/logs/slurm-%j.out, with `%` in the directory kept literal (Slurm expands %j, %N...)."""
    if "\\" in run_dir:
        raise ConfigError(f"training.run_dir = {run_dir!r}: Slurm's log file names cannot hold a backslash")
    return run_dir.replace("%", "%%") + "/logs/slurm-%j.out"


def job_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "undertow"


def render_script(job: SlurmJob, cmd: PretrainCommand) -> str:
    """The sbatch script that trains `cmd` on `job`'s resources (see the module docstring)."""
    job.validate()
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# Written by `undertow launch slurm` (undertow {__version__}); submit with: sbatch THIS_FILE",
        directive("job-name", job.job_name or job_name(cmd.cfg.name)),
        directive("nodes", job.nodes),
        directive("ntasks-per-node", 1),
    ]
    if job.gpus_per_node:
        lines.append(directive("gpus-per-node", job.gpus_per_node))
    for option, value in (
        ("cpus-per-task", job.cpus_per_task), ("mem", job.mem), ("partition", job.partition),
        ("account", job.account), ("qos", job.qos), ("time", job.time), ("constraint", job.constraint),
    ):
        if value is not None:
            lines.append(directive(option, value))
    if job.exclusive:
        lines.append(directive("exclusive"))
    lines += [
        directive("output", log_pattern(cmd.run_dir)),
        directive("open-mode", "append"),
        directive("requeue"),
        directive("signal", f"B:USR1@{job.signal_before_s}"),
        "",
        "set -uo pipefail  # no -e: the training's exit status decides what happens at the end",
        "",
    ]
    if job.env_setup:
        lines += ["# --env-setup, run as written:", *job.env_setup, ""]
    lines += [
        f"export UNDERTOW_RUN_DIR={q(cmd.run_dir)}",
        'export UNDERTOW_LOG_DIR="$UNDERTOW_RUN_DIR/logs/slurm-$SLURM_JOB_ID"',
        'mkdir -p -- "$UNDERTOW_LOG_DIR"',
    ]
    lines += [f"export {key}={q(value)}" for key, value in TORCHRUN_ENV.items()]
    if job.cpus_per_task:
        lines.append(f"export OMP_NUM_THREADS={max(1, job.cpus_per_task // job.procs_per_node)}")
    if job.gpus_per_node:
        lines += [
            'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
            'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"',
        ]
    for item in job.env:
        key, value = item.split("=", 1)
        lines.append(f"export {key}={q(value)}")
    lines += [
        "",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "head_addr=$(scontrol show node \"$head_node\" | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)",
        'head_addr=${head_addr:-$head_node}',
        f"rdzv_port=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
        'echo "undertow: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST,'
        ' rendezvous $head_addr:$rdzv_port, rank logs in $UNDERTOW_LOG_DIR"',
        "",
        "time_limit=0",
        "on_usr1() {  # sent by Slurm (--signal=B:USR1@...) before the time limit",
        '    [ "$time_limit" = 1 ] && return',
        "    time_limit=1",
        '    echo "undertow: SIGUSR1 (time limit near): the ranks checkpoint after their step and stop; then requeue"',
        '    scancel --signal=USR1 "$SLURM_JOB_ID"  # to the job steps (torchrun and its workers), not this shell',
        "}",
        'on_term() { echo "undertow: SIGTERM (preemption, requeue or cancel): the ranks checkpoint after their step"; }',
        "trap on_usr1 USR1",
        "trap on_term TERM",
        "",
    ]
    srun = ["srun", '--nodes="$SLURM_JOB_NUM_NODES"', "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if job.cpus_per_task:
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.container_image:
        srun.append(f"--container-image={q(job.container_image)}")
    if job.container_mounts:
        srun.append(f"--container-mounts={q(job.container_mounts)}")
    python = job.python or ("python3" if job.container_image else _interpreter())
    torchrun = [
        # each node's torchrun keeps its rank logs in its own directory
        "bash", "-c", q('PET_LOG_DIR="$UNDERTOW_LOG_DIR/node$SLURM_NODEID" exec "$@"'), "undertow-node",
        q(python), "-m", "torch.distributed.run",
        '--nnodes="$SLURM_JOB_NUM_NODES"', "--rdzv-backend=c10d", '--rdzv-endpoint="$head_addr:$rdzv_port"',
        '--rdzv-id="$SLURM_JOB_ID"',
        *node_options(job.procs_per_node, job.max_restarts, job.signal_before_s),
        *(q(arg) for arg in cmd.module_args),
    ]
    lines += [
        " \\\n    ".join([" ".join(srun), *_wrap(torchrun)]) + " &",
        "srun_pid=$!",
        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done  # a trapped signal interrupts wait',
        'wait "$srun_pid"; status=$?',
        "",
        'if [ "$status" -eq 0 ]; then',
        '    echo "undertow: training finished"',
        f'elif [ "$time_limit" = 1 ] || [ "$status" -eq {EXIT_REQUEUE} ]; then',
        '    echo "undertow: training stopped (status $status); requeueing job $SLURM_JOB_ID, it resumes from the'
        ' newest checkpoint"',
        f'    scontrol requeue "$SLURM_JOB_ID" || exit {EXIT_REQUEUE}',
        "    exit 0",
        "fi",
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def _wrap(words: list[str], width: int = 100) -> list[str]:
    """Words joined into lines of about `width` characters (continued with backslashes by the caller)."""
    out, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*out, line] if line else out


def _interpreter() -> str:
    import sys

    return sys.executable


def submit(script_path: str) -> str:
    """sbatch the script; returns the job id."""
    try:
        out = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found: run this on a Slurm login node (or use --dry-run)") from None
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]
