"""Outside implementations that tests check our references against, read from their wheels
without installing them.

Some oracles must not be importable in the test environment: when the `xlstm` package is, the
transformers xLSTM switches to it instead of its own code, which the HF export tests check. So CI
downloads the oracle wheels (.ci/run: `pip download --no-deps ... -d .ci/oracles`) and tests load
what they need from there: one file (`load_file`), or a pure-Python package through zipimport
for the duration of a test (`importing`). Without the wheel the test skips and says how to get it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys
import zipfile

import pytest

WHEEL_DIR = pathlib.Path(os.environ.get("UNDERTOW_ORACLES", pathlib.Path(__file__).parents[1] / ".ci" / "oracles"))
PINS = {"xlstm": "2.0.6", "mlstm_kernels": "2.0.6"}


def wheel(name: str) -> pathlib.Path:
    found = sorted(WHEEL_DIR.glob(f"{name}-{PINS[name]}-*.whl"))
    if not found:
        pytest.skip(f"no {name} wheel in {WHEEL_DIR} (pip download --no-deps {name}=={PINS[name]} -d {WHEEL_DIR})")
    return found[-1]


def load_file(name: str, path_in_wheel: str, tmp_path: pathlib.Path):
    """The module of one file of wheel `name` (a file that imports nothing of its own package)."""
    target = tmp_path / pathlib.Path(path_in_wheel).name
    with zipfile.ZipFile(wheel(name)) as archive:
        target.write_bytes(archive.read(path_in_wheel))
    spec = importlib.util.spec_from_file_location(f"oracle_{target.stem}", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def importing(name: str, module: str):
    """Yields `module` imported from wheel `name` (zipimport); afterwards the wheel leaves sys.path
    and its modules sys.modules, so nothing else in the session sees the package."""
    path = str(wheel(name))
    if importlib.util.find_spec("transformers") is not None:
        # transformers decides once, when first imported, which optional packages it uses: let it
        # decide before the oracle is on the path, so it never adopts the oracle as `xlstm`
        importlib.import_module("transformers.models.xlstm.modeling_xlstm")
    sys.path.insert(0, path)
    try:
        try:
            yield importlib.import_module(module)
        except ImportError as e:
            pytest.skip(f"{module} from {path} does not import here: {e}")
    finally:
        sys.path.remove(path)
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
