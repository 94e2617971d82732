"""torchrun command lines: `undertow launch local` runs one; the Slurm script runs one per node.

torchrun (torch.distributed.run) starts the ranks of a node, restarts all of them when one dies
(`--max-restarts`; every rank then resumes from the newest complete checkpoint because the
command says `checkpoint.resume = auto`), keeps each rank's stdout/stderr under `--log-dir`
(`<log dir>/<run id>_<random>/attempt_<restart>/<local rank>/{stdout,stderr}.log`, also echoed
to the console with a `[default<rank>]:` prefix) and forwards stop signals: SIGUSR1 is added to
the signals it handles, so a time-limit warning reaches the workers (which checkpoint and stop)
instead of killing torchrun, and `--shutdown-timeout` gives them time to write that checkpoint
before torchrun falls back to SIGKILL.

`python -m undertow.launch.torchrun ARGS` is torchrun (`python -m torch.distributed.run ARGS`) run in
this process, with one change to its exit code: torchrun reports any ending of its ranks but
success as 1, so a wrapper could not tell a preemption from a crash. Here, when every failed rank
exited with EXIT_REQUEUE (they checkpointed after a stop signal), or torchrun itself got a stop
signal (it forwards it to the ranks, which checkpoint and exit EXIT_REQUEUE), the exit code is
EXIT_REQUEUE too.
"""

from __future__ import annotations

import functools
import os
import sys

from undertow.launch.command import PretrainCommand
from undertow.pretrain.signals import EXIT_REQUEUE, STOP_SIGNALS

SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# torchrun's agent shares its rendezvous TCPStore with the workers by default, and keys of an earlier
# attempt survive in it: after a restart a rank can read a dead peer's address and fail to connect
# (pytorch/pytorch#135712, #167288). A store per attempt avoids that.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
RANK_LOGS = "3"  # redirect and tee stdout and stderr of every rank


@functools.cache
def _torchrun_options() -> frozenset[str]:
    from torch.distributed.run import get_args_parser

    return frozenset(opt for action in get_args_parser()._actions for opt in action.option_strings)


def node_options(nproc_per_node: int, max_restarts: int, shutdown_timeout_s: int) -> list[str]:
    """The torchrun options shared by local and Slurm launches (everything but rendezvous and log dir).
    Options this torch's torchrun lacks (older releases) are left out rather than failing the launch."""
    opts = [
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        f"--redirects={RANK_LOGS}",
        f"--tee={RANK_LOGS}",
    ]
    if "--signals-to-handle" in _torchrun_options():
        opts.append(f"--signals-to-handle={SIGNALS_TO_HANDLE}")
    if "--shutdown-timeout" in _torchrun_options():
        opts.append(f"--shutdown-timeout={shutdown_timeout_s}")
    return opts


def default_nproc_per_node() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def local_argv(
    cmd: PretrainCommand, nproc_per_node: int, max_restarts: int, shutdown_timeout_s: int, python: str | None = None
) -> list[str]:
    """`python -m undertow.launch.torchrun --standalone ... -m undertow.cli pretrain ...` for this machine
    (torchrun passing EXIT_REQUEUE on, see main). --standalone runs the c10d rendezvous on a free local
    port, so several jobs can share a machine."""
    return [
        python or sys.executable, "-m", "undertow.launch.torchrun",
        "--standalone", "--nnodes=1",
        *node_options(nproc_per_node, max_restarts, shutdown_timeout_s),
        f"--log-dir={os.path.join(cmd.run_dir, 'logs', 'local')}",
        *cmd.module_args,
    ]


def main(argv: list[str] | None = None) -> int:
    """torchrun with `argv` in this process; its exit code, except EXIT_REQUEUE after a preemption."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as e:
        if {failure.exitcode for failure in e.failures.values()} != {EXIT_REQUEUE}:
            raise
        print(f"undertow: the ranks stopped after a stop signal and checkpointed; exit code {EXIT_REQUEUE} "
              "asks for a requeue", file=sys.stderr)
        return EXIT_REQUEUE
    except SignalException as e:
        if e.sigval not in STOP_SIGNALS:
            raise
        print(f"undertow: {e.sigval.name} received and forwarded to the ranks (which checkpoint and exit); "
              f"exit code {EXIT_REQUEUE} asks for a requeue", file=sys.stderr)
        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
