"""Damaged checkpoints (issue 13, part 1): every checkpoint carries a manifest of its files' sizes and
sha256; a resume verifies the checkpoint it loads, sets a damaged one aside (renamed, never deleted)
and falls back to the newest good one, and stops with one line (exit 2) when none is good."""

import json
import os
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.pretrain.helpers import cli_args, read_losses, tiny_config
from undertow.cli import main
from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain.checkpoint_manifest import MANIFEST_NAME
from undertow.pretrain.trainer import Trainer

RUN = {"training__steps": 6, "checkpoint__every": 2, "checkpoint__keep_last": 3}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny run of 6 steps with checkpoints at steps 2, 4 and 6, and its losses."""
    run_dir = tmp_path_factory.mktemp("source")
    Trainer(tiny_config(run_dir, **RUN)).fit()
    return run_dir, read_losses(run_dir)


@pytest.fixture
def run(source_run, tmp_path):
    """A fresh copy of the source run (without its metrics, so that a resumed run's are its own)."""
    copy = tmp_path / "run"
    shutil.copytree(source_run[0], copy)
    os.remove(copy / "metrics.jsonl")
    return copy


def step_path(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte_inside_a_tensor(ckpt_dir):
    """Flip the exponent byte of one float32 weight inside the data file (the file keeps its size)."""
    name = "model.embed.weight"
    meta = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    key = name if name in meta else max((k for k in meta if k.startswith("model.")), key=lambda k: meta[k].size.numel())
    tensor = torch.empty(meta[key].size, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.load({"model": {key.removeprefix("model."): tensor}}, checkpoint_id=str(ckpt_dir))
    data_file = ckpt_dir / "__0_0.distcp"
    data = bytearray(data_file.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0, "tensor bytes not found in the data file"
    data[at + 4 * 10 + 3] ^= 0x40
    data_file.write_bytes(bytes(data))


def assert_fell_back_to_step_4(run_dir, reason, file_name, warnings_seen):
    trainer = Trainer(tiny_config(run_dir, **RUN))
    assert trainer.step == 4 and trainer.resumed_from == str(step_path(run_dir, 4))
    aside = run_dir / "checkpoints" / f"step_00000006.damaged-{reason}"
    assert aside.is_dir() and not step_path(run_dir, 6).exists()
    assert any("DAMAGED CHECKPOINT" in w and file_name in w for w in warnings_seen), warnings_seen
    return trainer


def test_every_checkpoint_has_a_manifest_of_its_files(source_run):
    path = step_path(source_run[0], 6)
    files = json.loads((path / MANIFEST_NAME).read_text())["files"]
    assert set(files) == set(os.listdir(path)) - {MANIFEST_NAME}
    assert {".metadata", "meta.json", "__0_0.distcp"} <= set(files)
    assert all(files[n]["size"] == os.path.getsize(path / n) for n in files)
    ckpt.verify_checkpoint(str(path), "sha256")


def test_truncated_data_file_falls_back_to_previous_checkpoint(run, warnings_seen):
    truncate(step_path(run, 6) / "__0_0.distcp")
    assert_fell_back_to_step_4(run, "size", "__0_0.distcp", warnings_seen)


def test_truncated_metadata_falls_back_to_previous_checkpoint(run, warnings_seen):
    truncate(step_path(run, 6) / ".metadata")
    assert_fell_back_to_step_4(run, "size", ".metadata", warnings_seen)


def test_unreadable_checkpoint_without_verification_falls_back(run, warnings_seen):
    """With checkpoint.verify = off, the load itself raising marks the checkpoint damaged."""
    truncate(step_path(run, 6) / "__0_0.distcp")
    trainer = Trainer(tiny_config(run, **RUN, checkpoint__verify="off"))
    assert trainer.step == 4
    assert (run / "checkpoints" / "step_00000006.damaged-unreadable").is_dir()
    assert any("loading it failed" in w for w in warnings_seen), warnings_seen


def test_bit_flip_is_found_by_sha256_not_size_and_resume_is_exact(run, source_run, warnings_seen):
    """The issue's case: one flipped byte used to load silently and change every loss after it."""
    flip_byte_inside_a_tensor(step_path(run, 6))
    ckpt.verify_checkpoint(str(step_path(run, 6)), "size")  # same size: only the checksum sees it
    with pytest.raises(ckpt.CheckpointDamaged, match="__0_0.distcp has sha256"):
        ckpt.verify_checkpoint(str(step_path(run, 6)), "sha256")
    trainer = assert_fell_back_to_step_4(run, "sha256", "__0_0.distcp", warnings_seen)
    trainer.fit()
    expected = {step: loss for step, loss in source_run[1].items() if step > 4}
    assert read_losses(run) == expected


def test_no_good_checkpoint_stops_with_one_line_and_exit_2(run, capsys):
    for step in (2, 4, 6):
        truncate(step_path(run, step) / "__0_0.distcp")
    assert main(["pretrain", *cli_args(run, **{k.replace("__", "."): v for k, v in RUN.items()})]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no usable checkpoint" in errors[0], err
    assert "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()  # nothing trained
    assert sorted(os.listdir(run / "checkpoints")) == [f"step_{s:08d}.damaged-size" for s in (2, 4, 6)]
    # the same command again does not start over silently
    assert main(["pretrain", *cli_args(run, **{k.replace("__", "."): v for k, v in RUN.items()})]) == 2


def test_damaged_explicit_path_stops_and_stays_in_place(run):
    path = step_path(run, 4)
    truncate(path / ".metadata")
    with pytest.raises(ckpt.CheckpointDamaged, match=r"\.metadata has \d+ bytes, expected \d+"):
        Trainer(tiny_config(run, **RUN, checkpoint__resume=str(path)))
    assert path.is_dir()


def test_damaged_init_from_stops_before_training(run, tmp_path):
    path = step_path(run, 6)
    flip_byte_inside_a_tensor(path)
    with pytest.raises(ckpt.CheckpointDamaged, match="__0_0.distcp has sha256"):
        Trainer(tiny_config(tmp_path / "new", **RUN, checkpoint__init_from=str(path)))
    assert path.is_dir()


def test_checkpoint_without_manifest_resumes_with_a_warning(run, warnings_seen):
    os.remove(step_path(run, 6) / MANIFEST_NAME)
    trainer = Trainer(tiny_config(run, **RUN))
    assert trainer.step == 6
    assert sum("no manifest.json" in w for w in warnings_seen) == 1, warnings_seen


def test_manifest_is_written_before_the_commit(tmp_path, monkeypatch):
    """A crash between the save and the rename leaves a temporary directory that already has its
    manifest: no committed checkpoint can lack one."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(str(tmp_path), 1, model, opt, {}, keep_last=1)
    tmp = tmp_path / ".step_00000001.tmp"
    files = json.loads((tmp / MANIFEST_NAME).read_text())["files"]
    assert set(files) == set(os.listdir(tmp)) - {MANIFEST_NAME}
    ckpt.verify_checkpoint(str(tmp), "sha256")


def _two_ranks_fall_back(rank, world_size, root):
    """Both ranks save steps 1 and 2, rank 0 damages one of step 2's data files, both resume."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, model, opt, {}, keep_last=2)
    newest = os.path.join(root, "step_00000002")
    if rank == 0:
        files = json.loads(open(os.path.join(newest, MANIFEST_NAME)).read())["files"]
        data_files = sorted(n for n in files if n.endswith(".distcp"))
        flip = os.path.join(newest, data_files[-1])  # the last rank's file that holds data
        with open(flip, "r+b") as f:
            f.seek(os.path.getsize(flip) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    path, meta = ckpt.load_newest_good(root, model, opt, "sha256")
    return path, meta["step"], sorted(os.listdir(root)), data_files if rank == 0 else None


def test_ranks_agree_on_a_damaged_checkpoint(tmp_path):
    from tests.distributed.harness import run_distributed

    results = run_distributed(_two_ranks_fall_back, 2, str(tmp_path), retry_crash=False)
    assert [r[:3] for r in results] == [(str(tmp_path / "step_00000001"), 1,
                                          ["step_00000001", "step_00000002.damaged-sha256"])] * 2
    assert results[0][3], "no data file written"
