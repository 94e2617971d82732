"""The generated command lines and sbatch scripts, without a cluster: what bash and sbatch make of them.

The script is run by bash with fake `srun`, `scontrol` and `scancel` on PATH that record their
arguments, so the test sees exactly what the training command would receive, and that nothing in
a hostile value was executed."""

import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from undertow.cli import build_parser, main
from undertow.configtools import ConfigError
from undertow.launch.slurm import directive

from tests.launch.helpers import TINY_ARGS

# Each part would create a file in the working directory if a shell ever evaluated it.
HOSTILE = "x $(touch p1) `touch p2`; touch p3 && touch p4 | 'q' \"dq\" \\ #h %j $HOME"


def sbatch_argument(line: str) -> str:
    """What sbatch reads from `#SBATCH ARG`: its parser's rules (quotes group, backslash escapes, an unquoted
    # ends the line), as in Slurm's src/sbatch/opt.c."""
    text, out, quote, escape = line[len("#SBATCH "):], [], None, False
    for ch in text:
        if escape:
            out.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif quote:
            if ch == quote:
                quote = None
            else:
                out.append(ch)
        elif ch in "\"'":
            quote = ch
        elif ch == "#" or ch.isspace():
            break
        else:
            out.append(ch)
    return "".join(out)


def write_fakes(bin_dir, record_dir):
    """srun records its argv (NUL-separated) and the variables the script exported; scontrol answers
    `show hostnames` and `show node`; scancel records its argv."""
    bin_dir.mkdir()
    scripts = {
        "srun": f'printf "%s\\0" "$@" > {shlex.quote(str(record_dir))}/srun.argv\n'
                f'env -0 > {shlex.quote(str(record_dir))}/srun.env\nexit "${{FAKE_SRUN_STATUS:-0}}"\n',
        "scontrol": 'case "$1 $2" in\n  "show hostnames") echo node7;;\n  "show node") echo "NodeName=node7 '
                    'NodeAddr=10.1.2.3 Arch=x86_64";;\n  *) printf "%s\\0" "$@" >> '
                    f'{shlex.quote(str(record_dir))}/scontrol.argv;;\nesac\n',
        "scancel": f'printf "%s\\0" "$@" >> {shlex.quote(str(record_dir))}/scancel.argv\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_script(script: str, tmp_path, status: int = 0) -> tuple[list[str], dict, subprocess.CompletedProcess]:
    """Run the script with bash in tmp_path/cwd; returns srun's argv, the environment srun saw, bash's result."""
    record = tmp_path / "record"
    record.mkdir()
    write_fakes(tmp_path / "bin", record)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    (tmp_path / "cwd").mkdir()
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node7", "SLURM_JOB_NUM_NODES": "1", "FAKE_SRUN_STATUS": str(status)}
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=60,
                         cwd=tmp_path / "cwd")
    argv = (record / "srun.argv").read_bytes().decode().split("\0")[:-1]
    exported = dict(item.split("=", 1) for item in (record / "srun.env").read_bytes().decode().split("\0") if "=" in item)
    return argv, exported, out


def launch_slurm(capsys, *args) -> str:
    assert main(["launch", "slurm", "tiny", *TINY_ARGS, *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_hostile_values_reach_the_training_command_literally(tmp_path, capsys):
    run_dir = str(tmp_path / "runs" / HOSTILE.replace("\\", ""))  # Slurm log names cannot hold a backslash
    ckpt_dir = HOSTILE + "\nsecond line"  # body only: may hold a line break
    script = launch_slurm(
        capsys, "--training.run_dir", run_dir, "--checkpoint.dir", ckpt_dir, "--name", "evil$(touch p5)",
        "--env", f"PROBE={HOSTILE}", "--env", "MULTI=a\nb", "--container-image", HOSTILE,
        "--python", "/opt/py " + HOSTILE, "--partition", HOSTILE, "--account", "acc'#x", "--job-name", HOSTILE,
    )
    argv, exported, out = run_script(script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert os.listdir(tmp_path / "cwd") == [], "a hostile value was executed"
    # what the training receives, token by token
    i = argv.index("undertow.cli")
    assert argv[i + 1:i + 3] == ["pretrain", "tiny"]
    received = argv[i + 3:]
    for expected in (f"--training.run_dir={run_dir}", f"--checkpoint.dir={ckpt_dir}", "--name=evil$(touch p5)",
                     "--checkpoint.resume=auto", "--model.d_model=32"):
        assert expected in received, expected
    assert f"--container-image={HOSTILE}" in argv
    assert argv[argv.index("undertow-node") + 1] == "/opt/py " + HOSTILE
    assert exported["PROBE"] == HOSTILE and exported["MULTI"] == "a\nb"
    assert exported["UNDERTOW_RUN_DIR"] == run_dir
    # what sbatch reads from the #SBATCH lines
    directives = dict(sbatch_argument(line).split("=", 1) for line in script.splitlines()
                      if line.startswith("#SBATCH ") and "=" in line)
    assert directives["--partition"] == HOSTILE
    assert directives["--account"] == "acc'#x"
    assert directives["--job-name"] == HOSTILE
    assert directives["--output"] == run_dir.replace("%", "%%") + "/logs/slurm-%j.out"


def test_the_rendezvous_is_on_the_first_nodes_address_and_stop_signals_are_handled(tmp_path, capsys):
    script = launch_slurm(capsys, "--training.run_dir", str(tmp_path / "run"), "--nodes", "4",
                          "--gpus-per-node", "8", "--parallel.dp_shard", "32", "--cpus-per-task", "64", "--time", "01:00:00",
                          "--signal-before", "300", "--max-restarts", "2", "--exclusive")
    lines = script.splitlines()
    for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --cpus-per-task=64", "#SBATCH --time=01:00:00", "#SBATCH --exclusive",
                     "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append",
                     "export OMP_NUM_THREADS=8"):
        assert expected in lines, expected
    argv, exported, out = run_script(script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--rdzv-endpoint=10.1.2.3:14242" in argv  # NodeAddr of the first node; 10000 + 4242
    for expected in ("--rdzv-backend=c10d", "--rdzv-id=4242", "--nnodes=1", "--nproc-per-node=8",
                     "--max-restarts=2", "--shutdown-timeout=300", "--ntasks-per-node=1", "--kill-on-bad-exit=1"):
        assert expected in argv, expected
    assert any(a.startswith("--signals-to-handle=") and "SIGUSR1" in a for a in argv)
    assert exported["NCCL_DEBUG"] == "WARN" and exported["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert exported["UNDERTOW_LOG_DIR"] == f"{tmp_path / 'run'}/logs/slurm-4242"
    assert "training finished" in out.stdout
    assert not (tmp_path / "record" / "scontrol.argv").exists()  # no requeue


@pytest.mark.parametrize("status,requeued", [(75, True), (1, False)])
def test_the_script_requeues_its_job_when_the_training_asks(tmp_path, capsys, status, requeued):
    script = launch_slurm(capsys, "--training.run_dir", str(tmp_path / "run"))
    _, _, out = run_script(script, tmp_path, status=status)
    calls = (tmp_path / "record" / "scontrol.argv")
    if requeued:
        assert calls.read_bytes().split(b"\0")[:-1] == [b"requeue", b"4242"]
        assert out.returncode == 0
    else:
        assert not calls.exists() and out.returncode == status


def test_time_limit_signal_reaches_the_steps_then_the_job_requeues(tmp_path, capsys):
    """SIGUSR1 to the batch shell (as --signal=B:USR1@T sends it): scancel passes it to the job steps, and
    when the training then stops unfinished the job requeues itself."""
    script = launch_slurm(capsys, "--training.run_dir", str(tmp_path / "run"))
    record = tmp_path / "record"
    record.mkdir()
    write_fakes(tmp_path / "bin", record)
    # this srun runs until the batch shell forwards the signal, then stops like torchrun does (status 1)
    (tmp_path / "bin" / "srun").write_text(
        f"#!/bin/bash\ntouch {record}/srun.started\nwhile [ ! -s {record}/scancel.argv ]; do sleep 0.05; done\nexit 1\n")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node7",
           "SLURM_JOB_NUM_NODES": "1"}
    job = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    while not (record / "srun.started").exists():  # the traps are set before srun starts
        assert job.poll() is None, job.stdout.read()
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    assert (record / "scancel.argv").read_bytes().split(b"\0")[:-1] == [b"--signal=USR1", b"77"]
    assert (record / "scontrol.argv").read_bytes().split(b"\0")[:-1] == [b"requeue", b"77"]
    assert "time limit near" in out


@pytest.mark.parametrize("option", ["--partition", "--time", "--account", "--job-name"])
def test_line_breaks_cannot_reach_an_sbatch_line(tmp_path, capsys, option):
    code = main(["launch", "slurm", "tiny", "--training.run_dir", str(tmp_path), option, "gpu\n#SBATCH --wrap=id",
                 "--dry-run"])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert option in out.err and "line break" in out.err


def test_directive_escapes_for_sbatch():
    assert directive("partition", "gpu") == "#SBATCH --partition=gpu"
    for value in ['a b', 'a"b', "a'b", "a#b", "a\\b", "$(id)", "`id`", "a;b"]:
        assert sbatch_argument(directive("x", value)) == f"--x={value}"
    with pytest.raises(ConfigError):
        directive("x", "a\rb")


def test_a_launched_job_must_resume_automatically(tmp_path, capsys):
    code = main(["launch", "slurm", "tiny", "--training.run_dir", str(tmp_path), "--checkpoint.resume", "none",
                 "--dry-run"])
    assert code == 2 and "checkpoint.resume" in capsys.readouterr().err


@pytest.mark.parametrize("launcher,processes", [
    (["local", "--nproc-per-node", "2"], 2), (["slurm", "--nodes", "2", "--gpus-per-node", "4"], 8),
])
def test_the_layout_must_fill_the_launched_processes(tmp_path, capsys, launcher, processes):
    code = main(["launch", *launcher, "tiny", "--training.run_dir", str(tmp_path), "--parallel.dp_shard", "3",
                 "--dry-run"])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert "needs 3 processes" in out.err and f"starts {processes}" in out.err


@pytest.mark.parametrize("overrides,message", [
    (["--parallel.tp", "2", "--model.n_kv_heads", "1"], "tp=2 does not divide n_kv_heads=1"),
    (["--parallel.pp", "2", "--parallel.pp_microbatches", "1"], "use --parallel.pp_microbatches 2"),
])
def test_a_layout_the_model_or_schedule_cannot_run_is_refused_before_launch(tmp_path, capsys, overrides, message):
    code = main(["launch", "local", "--nproc-per-node", "2", "tiny", "--training.run_dir", str(tmp_path / "run"),
                 *overrides, "--dry-run"])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and message in out.err and out.err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_bad_config_fails_before_anything_is_written(tmp_path, capsys):
    code = main(["launch", "slurm", "tiny", "--training.run_dir", str(tmp_path / "run"), "--model.d_model", "-3"])
    assert code == 2 and "model.d_model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_local_dry_run_is_a_torchrun_command(tmp_path, capsys):
    recipe = tmp_path / "my recipe.toml"
    recipe.write_text('name = "mine"\n[model]\nfamily = "transformer"\n')
    assert main(["launch", "local", str(recipe), "--nproc-per-node", "3", "--max-restarts", "2", "--parallel.dp_shard", "3",
                 "--training.run_dir", str(tmp_path / "r $x"), "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # a store per restart attempt
    argv = argv[1:]
    assert argv[:3] == [sys.executable, "-m", "undertow.launch.torchrun"]  # torchrun, passing exit 75 on
    for expected in ("--standalone", "--nproc-per-node=3", "--max-restarts=2",
                     f"--log-dir={tmp_path / 'r $x'}/logs/local"):
        assert expected in argv, expected
    i = argv.index("undertow.cli")
    assert argv[i - 1] == "-m" and argv[i + 1:i + 3] == ["pretrain", str(recipe)]
    assert f"--training.run_dir={tmp_path / 'r $x'}" in argv and "--checkpoint.resume=auto" in argv


def test_every_launch_option_has_help():
    parser = build_parser()
    launch = parser._subparsers._group_actions[0].choices["launch"]
    kinds = launch._subparsers._group_actions[0].choices
    assert set(kinds) == {"local", "slurm"}
    for kind in kinds.values():
        assert kind.description and kind.epilog
        for action in kind._actions:
            assert action.help and len(action.help) > 10, (kind.prog, action.dest)
