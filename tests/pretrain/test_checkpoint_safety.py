"""Opening a checkpoint runs no code (issue 13, part 5): DCP's `.metadata` is read through a
restricted unpickler and the non-tensor values with torch.load(weights_only=True), before DCP
unpickles anything, on every path that opens a checkpoint: resume (auto and a path), init_from and
`undertow convert to-hf`. A crafted file is refused with one line (exit 2) and its payload never runs."""

import io
import json
import os
import pickle
import shutil

import pytest
import torch

from tests.pretrain.helpers import cli_args, tiny_config
from undertow.cli import main
from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain.checkpoint_manifest import MANIFEST_NAME, file_digest
from undertow.pretrain.safe_checkpoint import ADMITTED_GLOBALS, read_metadata_safely
from undertow.pretrain.trainer import Trainer

RUN = {"training__steps": 2, "checkpoint__every": 2}
STEP = "step_00000002"


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny run of 2 steps with one checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("source")
    Trainer(tiny_config(run_dir, **RUN)).fit()
    return run_dir


@pytest.fixture
def run(source_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(source_run, copy)
    return copy


class _Payload:
    """Unpickling it writes `marker`: what a crafted checkpoint would do (with worse code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _record_in_manifest(ckpt_dir, name):
    """An attacker rewrites the manifest too: the checkpoint verifies, so only the unpickler stands."""
    manifest = ckpt_dir / MANIFEST_NAME
    data = json.loads(manifest.read_text())
    data["files"][name] = file_digest(str(ckpt_dir / name))
    manifest.write_text(json.dumps(data))


def craft_metadata(ckpt_dir, marker):
    """Replace the checkpoint's `.metadata` by the genuine metadata carrying the payload inside."""
    metadata = read_metadata_safely(str(ckpt_dir / ".metadata"))
    metadata.planner_data = _Payload(marker)
    (ckpt_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    _record_in_manifest(ckpt_dir, ".metadata")


def craft_byte_item(ckpt_dir, marker):
    """Point one non-tensor value (an optimizer hyperparameter, saved by torch.save) at a payload
    appended to its data file; the `.metadata` itself stays made of admitted classes only."""
    metadata = read_metadata_safely(str(ckpt_dir / ".metadata"))
    index = next(i for i in metadata.storage_data if i.fqn.startswith("optim.param_groups."))
    info = metadata.storage_data[index]
    data_file = ckpt_dir / info.relative_path
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    info.offset, info.length = data_file.stat().st_size, len(buffer.getvalue())
    with open(data_file, "ab") as f:
        f.write(buffer.getvalue())
    (ckpt_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    _record_in_manifest(ckpt_dir, ".metadata")
    _record_in_manifest(ckpt_dir, info.relative_path)


def assert_refused(code, capsys, marker, what="builtins.exec"):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: refusing to ") and what in err[0], err
    assert not marker.exists(), "the payload ran"


def test_genuine_metadata_references_only_admitted_globals(source_run):
    recorded = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            recorded.add((module, name))
            return super().find_class(module, name)

    with open(source_run / "checkpoints" / STEP / ".metadata", "rb") as f:
        Recording(f).load()  # our own checkpoint: safe to unpickle here
    assert recorded and recorded <= ADMITTED_GLOBALS


def test_genuine_checkpoint_resumes(run):
    trainer = Trainer(tiny_config(run, **{**RUN, "training__steps": 3}))
    assert trainer.step == 2 and trainer.resumed_from == str(run / "checkpoints" / STEP)


@pytest.mark.parametrize("resume", ["auto", "path"])
def test_crafted_metadata_is_refused_on_resume(run, tmp_path, capsys, resume):
    path = run / "checkpoints" / STEP
    marker = tmp_path / "marker"
    craft_metadata(path, marker)
    extra = {"checkpoint.resume": str(path)} if resume == "path" else {}
    assert_refused(main(["pretrain", *cli_args(run, **{"training.steps": 3, **extra})]), capsys, marker)
    assert path.exists() and ckpt.damaged_checkpoints(str(run / "checkpoints")) == []  # not "damage"


def test_crafted_metadata_is_refused_on_init_from(run, tmp_path, capsys):
    path = run / "checkpoints" / STEP
    marker = tmp_path / "marker"
    craft_metadata(path, marker)
    args = cli_args(tmp_path / "new", **{"training.steps": 2, "checkpoint.init_from": str(path)})
    assert_refused(main(["pretrain", *args]), capsys, marker)


def test_crafted_metadata_is_refused_by_convert_to_hf(run, tmp_path, capsys):
    path = run / "checkpoints" / STEP
    marker = tmp_path / "marker"
    craft_metadata(path, marker)
    out = tmp_path / "hf"
    assert_refused(main(["convert", "to-hf", str(path), str(out)]), capsys, marker)
    assert not out.exists()


def test_crafted_byte_item_is_refused_on_resume(run, tmp_path, capsys):
    path = run / "checkpoints" / STEP
    marker = tmp_path / "marker"
    craft_byte_item(path, marker)
    assert_refused(main(["pretrain", *cli_args(run, **{"training.steps": 3})]), capsys, marker, "optim.param_groups.")
    assert os.path.isdir(path)


def test_truncated_meta_json_is_named_in_the_error(run, tmp_path, capsys):
    """Issue 13, part 6: not `error: Unterminated string starting at: ...` without the file."""
    meta = run / "checkpoints" / STEP / ckpt.META_NAME
    meta.write_text(meta.read_text()[:200])
    args = cli_args(tmp_path / "new", **{"training.steps": 2, "checkpoint.init_from": str(meta.parent)})
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(meta) in err[0] and "not valid JSON" in err[0], err
