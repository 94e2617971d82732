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
