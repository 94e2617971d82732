"""Layouts through the Trainer (FSDP2, HSDP, context and tensor parallel, combined): loss and every gradient equal the single-process run on the
same global batch; checkpoints written under one layout resume under another."""

import os

import pytest
import torch

from tests.distributed.harness import run_distributed
from undertow.pretrain.config import load_config
from undertow.pretrain.trainer import Trainer

# small shapes of the tiny recipes: one of each mixer kind in the hybrid
FAMILIES = {
    "transformer": ("tiny", ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2"]),
    "hybrid": ("tiny-hybrid", ["--model.d_model", "32", "--model.layer_pattern", "mM*-", "--model.d_state", "8",
                               "--model.headdim", "16", "--model.chunk_size", "8", "--model.ngroups", "2"]),
}
GLOBAL_BATCH, SEQ = 4, 32


def make_config(family: str, run_dir: str, extra: list[str]):
    recipe, overrides = FAMILIES[family]
    return load_config(recipe, overrides + [
        "--training.run_dir", run_dir, "--data.seq_len", str(SEQ), "--training.micro_batch_size", "2",
        "--training.val_every", "0", "--logging.tensorboard", "false", "--data.num_workers", "0",
        "--schedule.warmup_steps", "0", *extra,
    ])


def global_batch(vocab: int) -> dict:
    """A fixed batch with document boundaries inside rows, the same in every process."""
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    doc_ids = (torch.arange(SEQ) >= 11).int() + (torch.arange(SEQ) >= 25).int()
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(), "doc_ids": doc_ids.expand(GLOBAL_BATCH, SEQ).clone()}


def full_grads(model) -> dict:
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


def _step(rank, world, family, run_dir, layout):
    cfg = make_config(family, run_dir, layout)
    trainer = Trainer(cfg)
    batch = global_batch(cfg.model.vocab_size)
    per_rank = GLOBAL_BATCH // trainer.dims.dp
    mine = {k: v[trainer.dp_rank * per_rank:(trainer.dp_rank + 1) * per_rank] for k, v in batch.items()}
    loss, grad_norm, n_labels = trainer.train_step([mine])
    return loss, grad_norm, n_labels, full_grads(trainer.model)


LAYOUTS = {
    "fsdp2": ["--parallel.dp_shard", "2"],
    "hsdp2x2": ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"],
    "cp2": ["--parallel.cp", "2"],
    "fsdp2xcp2": ["--parallel.dp_shard", "2", "--parallel.cp", "2"],
    "tp2": ["--parallel.tp", "2"],
    "fsdp2xtp2": ["--parallel.dp_shard", "2", "--parallel.tp", "2"],
    "cp2xtp2": ["--parallel.cp", "2", "--parallel.tp", "2"],
    # pipeline stages sharded by FSDP2, split by TP (sequence-parallel activations cross the stage
    # boundary, 4 virtual stages of one block), sliced by CP
    "fsdp2xpp2": ["--parallel.pp", "2", "--parallel.dp_shard", "2", "--parallel.pp_microbatches", "2",
                  "--parallel.pp_schedule", "interleaved_1f1b", "--parallel.pp_virtual_stages", "2"],
    "tp2xpp2": ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.pp_microbatches", "2",
                "--parallel.pp_schedule", "zero_bubble", "--parallel.pp_virtual_stages", "2"],
    "cp2xpp2": ["--parallel.pp", "2", "--parallel.cp", "2", "--parallel.pp_microbatches", "2"],
}
DIMS = ("--parallel.pp", "--parallel.dp_replicate", "--parallel.dp_shard", "--parallel.cp", "--parallel.tp")
# 4-process layouts on the hybrid only (it has every mixer kind; 4 processes cost the most here)
CASES = [("transformer", "fsdp2"), ("transformer", "cp2"), ("hybrid", "fsdp2"), ("hybrid", "hsdp2x2"),
         ("hybrid", "cp2"), ("hybrid", "fsdp2xcp2"), ("transformer", "tp2"), ("hybrid", "tp2"),
         ("hybrid", "fsdp2xtp2"), ("hybrid", "cp2xtp2"), ("hybrid", "fsdp2xpp2"), ("hybrid", "tp2xpp2"),
         ("hybrid", "cp2xpp2")]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{l}" for f, l in CASES])
def test_data_and_context_parallel_step_equals_single_process(family, layout, tmp_path):
    layout = LAYOUTS[layout]
    world = 1
    for name, value in zip(layout[::2], layout[1::2]):
        world *= int(value) if name in DIMS else 1
    single = _step(0, 1, family, str(tmp_path / "single"), [])
    results = run_distributed(_step, world, family, str(tmp_path / "dp"), layout)
    seen = set()
    for loss, grad_norm, n_labels, grads in results:
        assert n_labels == single[2] == GLOBAL_BATCH * SEQ
        assert loss == pytest.approx(single[0], rel=1e-5)
        assert grad_norm == pytest.approx(single[1], rel=1e-4)
        if "--parallel.pp" not in layout:  # a pipeline rank holds its stages' parameters only
            assert grads.keys() == single[3].keys()
        for name, g in grads.items():
            ref = single[3][name]
            err = ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            assert err < 1e-4, f"{name}: relative error {err:.2e}"
            seen.add(name)
    assert seen == single[3].keys()


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


def test_checkpoints_reshard_between_layouts(tmp_path):
    """fsdp2 writes step 2; one process resumes it to step 4; fsdp2 resumes that to step 6. The
    logits right after each resume equal those of the layout that wrote the checkpoint."""
    run_dir = str(tmp_path / "run")
    [(s1, _, logits_a, _), _] = run_distributed(_train_and_read, 2, run_dir, ["--parallel.dp_shard", "2"], 2)
    assert s1 == 2
    # a run that resumes at its target step does no step: its logits are the checkpoint's; its one
    # data stream carries on both saved ranks' streams (tests/pretrain/test_loader_reshard.py)
    s, _, logits_b, inherited = _train_and_read(0, 1, run_dir, [], 2)
    assert s == 2 and torch.allclose(logits_a, logits_b, rtol=1e-5, atol=1e-5) and inherited == [2]
    s, loss, logits_c, _ = _train_and_read(0, 1, run_dir, [], 4)
    assert s == 4 and loss == loss  # finite, trained on
    outs = run_distributed(_train_and_read, 2, run_dir, ["--parallel.dp_shard", "2"], 4)
    for s, _, logits, _ in outs:
        assert s == 4 and torch.allclose(logits, logits_c, rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_00000002", "step_00000004"]


def _fit(rank, world, run_dir, layout, steps):
    """Train (or resume) the hybrid to `steps` with two micro-batches per step, a checkpoint every 2
    steps; return (step reached, last loss, the fixed batch's logits when the model is whole here)."""
    cfg = make_config("hybrid", run_dir, layout + ["--training.steps", str(steps), "--checkpoint.every", "2",
                                                   "--checkpoint.resume", "auto", "--training.grad_accum_steps", "2"])
    trainer = Trainer(cfg)
    result = trainer.fit()
    logits = None
    if trainer.pipeline is None:
        batch = global_batch(cfg.model.vocab_size)
        with torch.no_grad():
            logits = trainer.model(batch["input_ids"], doc_ids=batch["doc_ids"])
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    return result.steps, result.last_loss, logits


def test_tp2_x_pp2_trains_like_one_process_and_resumes_under_dp4(tmp_path):
    """tp2 x pp2 trains two steps to the one-process losses and writes step 2; one process and
    dp_shard 4 resume it with the logits of the one-process run's own step 2 (the same weights)."""
    layout = LAYOUTS["tp2xpp2"]
    outs = run_distributed(_fit, 4, str(tmp_path / "tp2xpp2"), layout, 2)
    step, ref_loss, ref_logits = _fit(0, 1, str(tmp_path / "single"), [], 2)
    for s, loss, _ in outs:
        assert s == step == 2 and loss == pytest.approx(ref_loss, rel=1e-5)
    s, _, logits = _fit(0, 1, str(tmp_path / "tp2xpp2"), [], 2)  # resumes at its target: no step
    assert s == 2 and torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for s, _, logits in run_distributed(_fit, 4, str(tmp_path / "tp2xpp2"), ["--parallel.dp_shard", "4"], 2):
        assert s == 2 and torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
