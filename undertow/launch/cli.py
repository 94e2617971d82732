"""`undertow launch local|slurm RECIPE [options] [--section.field VALUE ...]`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap

from undertow.pretrain.signals import EXIT_HUNG, EXIT_REQUEUE

_COMMON_EPILOG = f"""\
The recipe and the --section.field VALUE overrides are those of `undertow pretrain` (see
`undertow pretrain --help`); the config is validated here, before anything starts. The launched
command pins training.run_dir (as an absolute path) and checkpoint.resume = auto, so restarted
ranks and requeued jobs continue from the newest complete checkpoint.

Stop signals: SIGTERM or SIGUSR1 make every rank finish its step, write a checkpoint and exit
with code {EXIT_REQUEUE}; `launch local` then exits {EXIT_REQUEUE} too (any other failure: 1). A rank
stuck for training.hang_timeout_s exits with code {EXIT_HUNG} after reporting its rank, step, phase
and the collective it waits in; a collective that some rank never joins fails after
training.collective_timeout_s with the same report. See docs/launch.md.
"""


def add_launch_parser(sub) -> None:
    launch = sub.add_parser(
        "launch",
        help="run training with torchrun on this machine or as a Slurm job",
        description="Start `undertow pretrain` in several processes: torchrun on this machine (local) or "
        "an sbatch script with torchrun on every node (slurm).",
    )
    kinds = launch.add_subparsers(dest="launcher", required=True, metavar="{local,slurm}")

    local = kinds.add_parser(
        "local",
        usage="undertow launch local [RECIPE] [options] [--section.field VALUE ...]",
        help="torchrun on this machine",
        description=_wrap("Run `undertow pretrain RECIPE` under torchrun on this machine: --nproc-per-node ranks "
        "(GPUs, or CPU processes with gloo), a c10d rendezvous on a free local port, all ranks restarted "
        "from the newest checkpoint when one dies (--max-restarts), each rank's stdout/stderr under "
        "RUN_DIR/logs/local/<run id>/attempt_<n>/<local rank>/."),
        epilog=_COMMON_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(local)
    local.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                       help="ranks on this machine (default: the number of GPUs, or 1 without CUDA)")
    local.add_argument("--shutdown-timeout", type=int, default=120, metavar="SECONDS",
                       help="after a stop signal, how long torchrun lets the ranks checkpoint before SIGKILL "
                       "(default 120)")
    local.add_argument("--dry-run", action="store_true", help="print the torchrun command line and exit")
    local.set_defaults(func=cmd_local, takes_overrides=True)

    slurm = kinds.add_parser(
        "slurm",
        usage="undertow launch slurm [RECIPE] --nodes N --gpus-per-node G [options] [--dry-run | --submit] "
        "[--section.field VALUE ...]",
        help="write (and submit) an sbatch script",
        description=_wrap("Write an sbatch script that runs `undertow pretrain RECIPE` on --nodes nodes: one srun "
        "task per node starting torchrun (c10d rendezvous on the first node), logs under RUN_DIR/logs, a "
        "checkpoint and a requeue when the time limit nears (--signal-before) or the job is preempted. "
        "Without --dry-run or --submit the script is written (--script, default "
        "RUN_DIR/slurm/NAME.sbatch) and its path printed; with --submit only the job id goes to stdout."),
        epilog=_COMMON_EPILOG + "\n" + _wrap("Every value given here or in the config is shell-quoted in the "
        "script (and escaped for sbatch in #SBATCH lines, where line breaks are refused); only --env-setup is run "
        "as shell code, which is its purpose.") + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(slurm)
    slurm.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                       help="GPUs per node; one rank per GPU, NCCL (default 0: CPU nodes, gloo)")
    slurm.add_argument("--nproc-per-node", type=int, default=None, metavar="P",
                       help="ranks per node (default: --gpus-per-node, or 1 on CPU nodes; on CPU nodes, the number "
                       "of CPU processes)")
    slurm.add_argument("--cpus-per-task", type=int, default=None, metavar="C",
                       help="CPUs for each node's task (torchrun and its ranks); OMP_NUM_THREADS = C / ranks per node")
    slurm.add_argument("--mem", default=None, help="memory per node, as sbatch --mem takes it (e.g. 200G)")
    slurm.add_argument("--partition", default=None, help="sbatch --partition")
    slurm.add_argument("--account", default=None, help="sbatch --account")
    slurm.add_argument("--time", default=None, help="time limit, as sbatch --time takes it (e.g. 2-00:00:00)")
    slurm.add_argument("--qos", default=None, help="sbatch --qos")
    slurm.add_argument("--constraint", default=None, help="sbatch --constraint (node features)")
    slurm.add_argument("--exclusive", action="store_true", help="sbatch --exclusive (whole nodes)")
    slurm.add_argument("--job-name", default=None, help="job name (default: the config's name)")
    slurm.add_argument("--container-image", default=None, metavar="IMAGE",
                       help="run each node's torchrun in this container (srun --container-image, pyxis/enroot)")
    slurm.add_argument("--container-mounts", default=None, metavar="MOUNTS",
                       help="srun --container-mounts (e.g. /data:/data,/scratch/runs:/scratch/runs)")
    slurm.add_argument("--env-setup", action="append", default=[], metavar="SHELL",
                       help='shell code run before training, as written, e.g. "module load cuda/12.4" or '
                       '"source ~/venv/bin/activate" (repeatable; the only option run as code)')
    slurm.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                       help="export this variable in the job, quoted (repeatable), e.g. NCCL_SOCKET_IFNAME=ib0")
    slurm.add_argument("--signal-before", type=int, default=120, metavar="SECONDS",
                       help="SIGUSR1 this long before the time limit: checkpoint, stop and requeue (default 120); "
                       "also how long torchrun waits for the ranks to stop")
    slurm.add_argument("--python", default=None, metavar="PATH",
                       help="Python on the nodes (default: this interpreter, or python3 with --container-image)")
    slurm.add_argument("--script", default=None, metavar="PATH",
                       help="where to write the script (default RUN_DIR/slurm/NAME.sbatch)")
    mode = slurm.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script and exit (nothing written)")
    mode.add_argument("--submit", action="store_true", help="write the script, sbatch it and print the job id")
    slurm.set_defaults(func=cmd_slurm, takes_overrides=True)


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default=None, help="recipe name or .toml path (default: tiny)")
    parser.add_argument("--name", default=None, help="run name (default: the recipe's); used in training.run_dir")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="R",
                        help="restart all ranks of a node up to R times when one fails (default 0)")


def cmd_local(args: argparse.Namespace, overrides: list[str]) -> int:
    from undertow.launch.command import check_world_size, pretrain_command
    from undertow.launch.torchrun import TORCHRUN_ENV, default_nproc_per_node, local_argv

    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        print(f"error: --nproc-per-node = {args.nproc_per_node}: must be >= 1", file=sys.stderr)
        return 2
    if args.max_restarts < 0:
        print(f"error: --max-restarts = {args.max_restarts}: must be >= 0", file=sys.stderr)
        return 2
    cmd = pretrain_command(args.recipe, overrides, args.name)
    nproc = args.nproc_per_node or default_nproc_per_node()
    check_world_size(cmd.cfg, nproc, f"--nproc-per-node {nproc}")
    argv = local_argv(cmd, nproc, args.max_restarts, args.shutdown_timeout)
    if args.dry_run:
        print(" ".join(f"{key}={shlex.quote(value)}" for key, value in TORCHRUN_ENV.items()), shlex.join(argv))
        return 0
    print(f"undertow: {nproc} rank(s) under torchrun; rank logs in {os.path.join(cmd.run_dir, 'logs', 'local')}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(argv[0], argv, {**os.environ, **TORCHRUN_ENV})  # torchrun takes this process's place: signals reach it


def cmd_slurm(args: argparse.Namespace, overrides: list[str]) -> int:
    from undertow.launch.command import check_world_size, pretrain_command
    from undertow.launch.slurm import SlurmJob, render_script, submit

    cmd = pretrain_command(args.recipe, overrides, args.name)
    job = SlurmJob(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
        cpus_per_task=args.cpus_per_task, mem=args.mem, partition=args.partition, account=args.account,
        time=args.time, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive,
        job_name=args.job_name, container_image=args.container_image, container_mounts=args.container_mounts,
        env_setup=args.env_setup, env=args.env, signal_before_s=args.signal_before,
        max_restarts=args.max_restarts, python=args.python,
    )
    job.validate()
    check_world_size(cmd.cfg, job.nodes * job.procs_per_node,
                     f"--nodes {job.nodes} x {job.procs_per_node} processes per node")
    script = render_script(job, cmd)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    path = os.path.abspath(args.script or os.path.join(cmd.run_dir, "slurm", f"{cmd.cfg.name}.sbatch"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(os.path.join(cmd.run_dir, "logs"), exist_ok=True)  # sbatch opens the log file before the script runs
    with open(path, "w") as f:
        f.write(script)
    if not args.submit:
        print(f"wrote {path}; submit it with: sbatch {shlex.quote(path)}")
        return 0
    try:
        job_id = submit(path)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}: script {path}, log {os.path.join(cmd.run_dir, 'logs', f'slurm-{job_id}.out')}",
          file=sys.stderr)
    print(job_id)
    return 0
