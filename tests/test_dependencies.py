"""The dependency ranges of pyproject.toml are the tested ones: what is installed here (CI installs
the pins of .ci/constraints.txt) lies inside them, and so does every pin of the constraints file."""

import pathlib
from importlib import metadata

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

packaging = pytest.importorskip("packaging.requirements")

REPO = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements(extras=("test",)):
    reqs = [packaging.Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in extras:
        reqs += [packaging.Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def test_every_dependency_has_a_tested_range():
    for extra, reqs in [("", PYPROJECT["dependencies"]), *PYPROJECT["optional-dependencies"].items()]:
        for text in reqs:
            req = packaging.Requirement(text)
            kinds = {spec.operator for spec in req.specifier}
            assert ">=" in kinds, f"{text} ({extra or 'runtime'}): no lower bound"
            if req.name != "tomli":  # a backport for Python 3.10 only, frozen upstream
                assert "<" in kinds, f"{text} ({extra or 'runtime'}): no upper bound"


def test_installed_versions_are_inside_the_ranges():
    outside = []
    for req in requirements():
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            outside.append(f"{req.name}: not installed")
            continue
        if not req.specifier.contains(version.split("+")[0], prereleases=True):
            outside.append(f"{req.name} {version} outside {req.specifier}")
    assert outside == []


def test_ci_pins_are_inside_the_ranges():
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for req in requirements(extras=tuple(PYPROJECT["optional-dependencies"])):
        name = req.name.lower().replace("_", "-")
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
        elif req.name not in ("flash-attn",):  # CUDA-only: never installed by CI
            pytest.fail(f"{req.name} is not pinned in .ci/constraints.txt")


def test_the_package_works_without_triton(tmp_path):
    """Triton is an extra (CUDA builds of torch bring it): every module but the Triton kernels imports
    without it, and a model trains a step on CPU. Run in a Python whose packages are this one's but
    triton (links to each other entry of site-packages, `-S` so no .pth file adds it back)."""
    import os
    import subprocess
    import sys
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    packages = tmp_path / "site"
    packages.mkdir()
    for name in os.listdir(site):
        if not name.startswith("triton"):
            os.symlink(os.path.join(site, name), packages / name)
    script = tmp_path / "no_triton.py"
    script.write_text("""
import importlib, pkgutil
import undertow
for info in pkgutil.walk_packages(undertow.__path__, "undertow."):
    if not info.name.rsplit(".", 1)[-1].startswith("triton"):
        importlib.import_module(info.name)
from undertow.kernels.dispatch import triton_available
assert not triton_available()
import torch
from undertow.pretrain.config import load_config
from undertow.models import registry
cfg = load_config("tiny-mamba2", ["--model.d_model", "32", "--model.layer_pattern", "M*", "--model.vocab_size", "64"])
model = registry.build_model(cfg.model)
model.init_weights()
model(torch.randint(0, 64, (1, 16))).sum().backward()
print("ok")
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(packages)])}
    out = subprocess.run([sys.executable, "-S", str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
