"""Layouts through the Trainer (FSDP2, HSDP, context, tensor and pipeline parallel, alone and
combined), for every family row of tests/distributed/layouts.py: one step's loss and every
gradient, the validation loss after the AdamW step and a save + resume in the layout equal the
single-process run on the same global batches. Checkpoints written under one layout resume under
another, and tp2 x pp2 trains, validates and resumes like one process through Trainer.fit.

Two spawns in all (2 and 4 processes, on first use): each runs every layout case of its size and
this file's resume scenarios, one Trainer after another."""

import os
import shutil

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.distributed.layouts import (
    LAYOUTS,
    Once,
    cases,
    check_life,
    global_batch,
    is_pipelined,
    make_config,
    run_life,
    run_world,
    world_size,
)
from undertow.pretrain.trainer import Trainer


def _train_and_read(rank, world, run_dir, layout, steps):
    """Train (or resume) to `steps`, then return the logits of the fixed batch and the step reached."""
    cfg = make_config("hybrid", run_dir, layout + ["--training.steps", str(steps), "--checkpoint.every", "2",
                                                   "--checkpoint.resume", "auto"])
    trainer = Trainer(cfg)
    result = trainer.fit()
    batch = global_batch(cfg.model.vocab_size)
    with torch.no_grad():
        logits = trainer.model(batch["input_ids"], doc_ids=batch["doc_ids"])
    inherited = [len(slot.get("inherited", [])) for slot in trainer.train_loader.state_dict()["slots"]]
    return result.steps, result.last_loss, logits, inherited


def _fit(rank, world, run_dir, layout, steps):
    """Train (or resume) the hybrid to `steps` with two micro-batches per step, validating and
    writing a checkpoint every 2 steps; return (step reached, last loss, last validation loss, the
    fixed batch's logits when the model is whole here)."""
    cfg = make_config("hybrid", run_dir, layout + ["--training.steps", str(steps), "--checkpoint.every", "2",
                                                   "--checkpoint.resume", "auto", "--training.grad_accum_steps", "2",
                                                   "--training.val_every", "2", "--training.val_batches", "2"])
    trainer = Trainer(cfg)
    result = trainer.fit()
    logits = None
    if trainer.pipeline is None:
        batch = global_batch(cfg.model.vocab_size)
        with torch.no_grad():
            logits = trainer.model(batch["input_ids"], doc_ids=batch["doc_ids"])
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    return result.steps, result.last_loss, result.last_val_loss, logits


def _world(rank, world, root):
    """The layout cases of `world` processes, then this file's resume scenarios of that size. Starts by
    removing what an earlier attempt of this spawn wrote (run_distributed reruns a crashed spawn; a
    rerun must not resume the first attempt's checkpoints)."""
    if rank == 0:
        written = [f"{family}-{layout}" for family, layout in cases(world)]
        written += ["fsdp2-writes"] if world == 2 else ["tp2xpp2"] if world == 4 else []
        for name in written:
            shutil.rmtree(f"{root}/{name}", ignore_errors=True)
    torch.distributed.barrier()
    out = {"lives": run_world(rank, world, root)}
    if world == 2:  # fsdp2 writes step 2; fsdp2 resumes the one-process step 2 (written before the spawn)
        out["reshard"] = [_train_and_read(rank, world, f"{root}/{writer}-writes", LAYOUTS["fsdp2"], 2)
                          for writer in ("fsdp2", "single")]
    if world == 4:  # tp2 x pp2 (zero bubble) trains and validates to step 2; dp_shard 4 resumes its checkpoint
        out["tp2xpp2"] = [_fit(rank, world, f"{root}/tp2xpp2", layout, 2)
                          for layout in (LAYOUTS["tp2xpp2v"], ["--parallel.dp_shard", "4"])]
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="module")
def single_wrote_step_2(root):
    """The one-process run that fsdp2 resumes inside the 2-process spawn: (step, loss, logits, inherited)."""
    return _train_and_read(0, 1, f"{root}/single-writes", [], 2)


@pytest.fixture(scope="module")
def spawns(root, single_wrote_step_2):
    """world size -> the per-rank results of `_world`, one spawn each, started on first use."""
    return Once(lambda world: run_distributed(_world, world, root))


@pytest.fixture(scope="module")
def singles(root):
    """family -> its one-process life (layouts.run_life), run here on first use."""
    return Once(lambda family: run_life(family, "single", [], root))


@pytest.mark.parametrize("family,layout", cases(), ids=[f"{f}-{l}" for f, l in cases()])
def test_layout_equals_single_process(spawns, singles, family, layout):
    """Loss, gradient norm, every gradient, the validation after the step; the resume of step 1."""
    per_rank = [r["lives"][family, layout] for r in spawns[world_size(LAYOUTS[layout])]]
    check_life(per_rank, singles[family], is_pipelined(layout))


def test_checkpoints_reshard_between_layouts(spawns, single_wrote_step_2, root):
    """fsdp2 writes step 2: one process resumes it and trains on to step 4. One process writes step 2:
    fsdp2 resumes it. The logits right after each resume equal those of the layout that wrote it."""
    fsdp2 = [r["reshard"] for r in spawns[2]]
    (s, _, logits_fsdp2, _), _ = fsdp2[0]
    assert s == 2
    # a run that resumes at its target step does no step: its logits are the checkpoint's; its one
    # data stream carries on both saved ranks' streams (tests/pretrain/test_loader_reshard.py)
    s, _, logits, inherited = _train_and_read(0, 1, f"{root}/fsdp2-writes", [], 2)
    assert s == 2 and torch.allclose(logits_fsdp2, logits, rtol=1e-5, atol=1e-5) and inherited == [2]
    s, loss, _, _ = _train_and_read(0, 1, f"{root}/fsdp2-writes", [], 4)
    assert s == 4 and loss == loss  # finite, trained on
    assert sorted(os.listdir(f"{root}/fsdp2-writes/checkpoints")) == ["step_00000002", "step_00000004"]
    s_single, _, logits_single, _ = single_wrote_step_2
    for _, (s, _, logits, _) in fsdp2:
        assert s == s_single == 2 and torch.allclose(logits, logits_single, rtol=1e-5, atol=1e-5)


def test_tp2_x_pp2_fits_like_one_process_and_resumes_under_dp4(spawns, root):
    """tp2 x pp2 (zero bubble) trains two steps and validates (Trainer.fit, the held-out split; the
    validation crashed in loss_parallel before) to the one-process losses and writes step 2; one
    process and dp_shard 4 resume it with the logits of the one-process run's own step 2."""
    step, ref_loss, ref_val, ref_logits = _fit(0, 1, f"{root}/tp2xpp2-single", [], 2)
    assert step == 2 and ref_val is not None
    for (s, loss, val, _), (s_dp4, _, _, logits) in (r["tp2xpp2"] for r in spawns[4]):
        assert s == 2 and loss == pytest.approx(ref_loss, rel=1e-5) and val == pytest.approx(ref_val, rel=1e-5)
        assert s_dp4 == 2 and torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    s, _, _, logits = _fit(0, 1, f"{root}/tp2xpp2", [], 2)  # resumes at its target: no step
    assert s == 2 and torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
