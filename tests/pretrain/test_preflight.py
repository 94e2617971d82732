"""Found early, reported well: unwritable directories and too little disk are refused before the data and
the model are built, and a save that fails removes its temporary directory and names the real cause."""

import errno
import os
import shutil
from collections import namedtuple

import pytest

from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain import preflight
from undertow.pretrain import trainer as trainer_mod
from undertow.pretrain.preflight import PreflightError
from undertow.pretrain.trainer import Trainer

from tests.pretrain.helpers import tiny_config

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the trainer gets as far as resolving its data (what comes before the model)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data was resolved: the check came too late")

    monkeypatch.setattr(trainer_mod, "resolve_sources", refuse)


@pytest.mark.parametrize("field", ["checkpoint.dir", "training.run_dir"])
def test_unwritable_directory_is_refused_before_any_work(tmp_path, no_data, field):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file: nothing can be created under it, not even by root")
    run_dir = tmp_path / "run"
    overrides = {"checkpoint__dir": blocker / "ckpts"} if field == "checkpoint.dir" else {}
    if field == "training.run_dir":
        run_dir = blocker / "run"
    with pytest.raises(PreflightError, match=f"{field} = '{blocker}/.*' is not writable \\(Not a directory\\)"):
        Trainer(tiny_config(run_dir, **overrides))


def test_too_little_free_space_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 1000, 1000))
    built = []
    monkeypatch.setattr(trainer_mod.torch.nn.Module, "to_empty", lambda self, **kw: built.append(self))
    with pytest.raises(PreflightError) as e:
        Trainer(tiny_config(tmp_path, checkpoint__keep_last=2))
    message = str(e.value)
    assert not built
    assert "no space for the run's checkpoints at training.run_dir (its checkpoints/)" in message
    assert "checkpoint.keep_last = 2 checkpoints + 1 being written" in message and "0.00 GiB free" in message


def test_space_estimate_is_weights_plus_adamw_moments_in_float32(tmp_path):
    t = Trainer(tiny_config(tmp_path, training__steps=2))
    t.fit()
    saved = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt.latest_checkpoint(
        os.path.join(tmp_path, "checkpoints"))) for f in fs if f.endswith(".distcp"))
    assert t.checkpoint_bytes >= 12 * t.n_params  # weights + 2 moments (a tied weight under both names)
    assert 1.0 < saved / t.checkpoint_bytes < 1.1  # DCP's per-tensor headers: a few % at 40k parameters


@pytest.mark.parametrize("failure", ["enospc", "zip_writer"])
def test_a_failed_save_removes_its_tmp_and_says_no_space(tmp_path, monkeypatch, failure):
    t = Trainer(tiny_config(tmp_path, training__steps=2))
    real_save = ckpt.dcp.save

    def full_disk(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # a half-written checkpoint, then the disk is full
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.dcp, "save", full_disk)
    if failure == "zip_writer":  # no errno: the free space tells
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 4096, 4096))
    root = os.path.join(tmp_path, "checkpoints")
    with pytest.raises(OSError, match=f"no space left on device at {root}: the checkpoint needs ~.* GiB, "
                                      ".* GiB free") as e:
        t.save()
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(root) == []  # no .tmp left holding the space


def test_a_save_failing_for_another_reason_removes_its_tmp_and_keeps_the_cause(tmp_path, monkeypatch):
    t = Trainer(tiny_config(tmp_path, training__steps=2))

    def broken(state, checkpoint_id):
        os.makedirs(checkpoint_id, exist_ok=True)
        open(os.path.join(checkpoint_id, "__0_0.distcp"), "w").close()
        raise ValueError("a bug, not the disk")

    monkeypatch.setattr(ckpt.dcp, "save", broken)
    with pytest.raises(ValueError, match="a bug, not the disk"):
        t.save()
    assert os.listdir(os.path.join(tmp_path, "checkpoints")) == []
    assert shutil.disk_usage(tmp_path).free > 0
