import os
import shutil
import subprocess

import pytest

from tests.launch.helpers import DP2_ARGS, STEPS, TINY_ARGS, env, read_losses, undertow
from tests.launch.slurm_cluster import SlurmCluster, missing_binaries

SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client"]


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory):
    """Per-step losses of one uninterrupted `undertow pretrain` run of the launch tests' config."""
    run_dir = tmp_path_factory.mktemp("reference")
    out = undertow("pretrain", "tiny", *TINY_ARGS, "--training.run_dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.fixture(scope="session")
def reference_losses_dp2(tmp_path_factory):
    """Per-step losses of one uninterrupted two-process (FSDP, dp_shard 2) run, through `undertow launch local`."""
    run_dir = tmp_path_factory.mktemp("reference-dp2")
    out = undertow("launch", "local", "tiny", *TINY_ARGS, *DP2_ARGS, "--training.run_dir", str(run_dir),
                   "--nproc-per-node", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _ensure_slurm() -> None:
    """Slurm's daemons and clients from Debian's packages: installed with apt-get when missing (as .ci/run
    does); skip only where that cannot be done."""
    if not missing_binaries():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"Slurm is not installed ({', '.join(missing_binaries())} missing) and apt-get is not "
                    "available as root to install " + " ".join(SLURM_PACKAGES))
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *SLURM_PACKAGES]
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = subprocess.run(install, capture_output=True, text=True, env=apt_env)
    if out.returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=apt_env)
        out = subprocess.run(install, capture_output=True, text=True, env=apt_env)
    assert out.returncode == 0 and not missing_binaries(), f"apt-get could not install Slurm:\n{out.stderr[-2000:]}"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster (slurmctld + slurmd as root, in the foreground), SLURM_CONF exported."""
    _ensure_slurm()
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root (SlurmUser=root)")
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), env=env()) as cluster:
        yield cluster
