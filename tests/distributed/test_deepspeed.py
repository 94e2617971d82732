"""DeepSpeed ZeRO as the data-parallel engine (parallel.engine = "deepspeed") on two CPU processes:
ZeRO-1, ZeRO-2, ZeRO-3 with CPU offload (transformer) and ZeRO-3 (hybrid) train to FSDP2's
(dp_shard=2) losses and gradient norms step for step; a ZeRO-3 checkpoint resumes under FSDP2 and
in one process (same weights and AdamW moments: the same next steps), and ZeRO-3 resumes FSDP2's;
DeepSpeed's own checkpoint format converts to ours; a non-finite step is skipped as under FSDP2.

Every run happens inside one pair of spawned processes (importing DeepSpeed is slow), one Trainer
after another; the tests read the results. Skipped when DeepSpeed is not installed."""

import contextlib
import importlib.util
import json
import os
import shutil

import pytest
import torch

import undertow.parallel.deepspeed
import undertow.pretrain.trainer as trainer_mod
from tests.distributed.harness import run_distributed
from tests.distributed.layouts import FAMILIES, global_batch, make_config
from undertow.cli import main
from undertow.configtools import ConfigError
from undertow.pretrain.deepspeed_convert import convert_from_deepspeed
from undertow.pretrain.config import load_config
from undertow.pretrain.trainer import Trainer

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
SKIP_REASON = "DeepSpeed is not installed (pip install 'undertow[deepspeed]')"
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason=SKIP_REASON)
STEPS = 4
FSDP = ["--parallel.dp_shard", "2"]
ZERO = {stage: FSDP + ["--parallel.engine", "deepspeed", "--parallel.zero_stage", str(stage)] for stage in (1, 2, 3)}
ZERO["3-offload"] = ZERO[3] + ["--parallel.zero_offload", "true"]
# the ZeRO runs of each family (the hybrid has one block of each mixer kind), each against FSDP2
RUNS = {"transformer": [1, 2, "3-offload"], "hybrid": [3]}


def _run(family, run_dir, layout, resume="auto", deepspeed_dir=None):
    """Train (or resume) to STEPS, validating at the end; ({step: (loss, grad norm)} with the
    validation loss under "val", logits of the fixed batch)."""
    cfg = make_config(family, run_dir, layout + [
        "--training.steps", str(STEPS), "--checkpoint.every", "2", "--checkpoint.resume", resume,
        "--schedule.kind", "cosine", "--optimizer.lr", "1e-2", "--training.grad_accum_steps", "2",
        "--training.val_every", str(STEPS), "--training.val_batches", "2",
    ])
    trainer = Trainer(cfg)
    trainer.fit()
    if deepspeed_dir:  # DeepSpeed's own checkpoint format too
        trainer.model.save_checkpoint(deepspeed_dir)
    batch = global_batch(cfg.model.vocab_size)
    with torch.no_grad():
        logits = trainer.model(batch["input_ids"], doc_ids=batch["doc_ids"])
    steps = {}
    if trainer.rank == 0:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                if row["kind"] == "train":
                    steps[row["step"]] = (row["loss"], row["grad_norm"])
                elif row["kind"] == "val":
                    steps["val"] = row["loss"]
    return steps, logits


def _checkpoint_copy(rank, src_run, step, dst_run):
    """A new run directory holding only checkpoint `step` of src_run (resume = auto picks it)."""
    if rank == 0:
        name = f"step_{step:08d}"
        shutil.copytree(os.path.join(src_run, "checkpoints", name), os.path.join(dst_run, "checkpoints", name))
    torch.distributed.barrier()


@contextlib.contextmanager
def _poisoned_loss(call: int):
    """The trainer's `call`-th loss (counting micro-batches from 1) is NaN."""
    real, calls = trainer_mod.Trainer._loss_sum, [0]  # each forward's loss, fused or not

    def poisoned(self, batch):
        calls[0] += 1
        loss = real(self, batch)
        return loss * float("nan") if calls[0] == call else loss

    trainer_mod.Trainer._loss_sum = poisoned
    try:
        yield
    finally:
        trainer_mod.Trainer._loss_sum = real


def _all_runs(rank, world, root):
    import deepspeed.comm.torch

    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce on first use (minutes); gloo
    # does the collectives without it
    deepspeed.comm.torch.build_shm_op = lambda: None
    undertow.parallel.deepspeed.LOAD_CHUNK_ELEMENTS = 9000  # load a few parameters at a time
    out = {}
    for family, stages in RUNS.items():
        out[family, "fsdp"] = _run(family, f"{root}/{family}/fsdp", FSDP)
        for stage in stages:
            native = f"{root}/{family}/zero{stage}-deepspeed" if family == "hybrid" else None
            layout, run_dir = ZERO[stage], f"{root}/{family}/zero{stage}"
            out[family, f"zero{stage}"] = _run(family, run_dir, layout, deepspeed_dir=native)
    # a non-finite step (step 2's first micro-batch) is skipped alike
    for name, layout in (("fsdp_nan", FSDP), ("zero2_nan", ZERO[2])):
        with _poisoned_loss(3):
            out["transformer", name] = _run("transformer", f"{root}/transformer/{name}", layout)
    # FSDP2 resumes ZeRO-3's step 2; ZeRO-3 resumes FSDP2's step 2
    hybrid = f"{root}/hybrid"
    _checkpoint_copy(rank, f"{hybrid}/zero3", 2, f"{hybrid}/fsdp_from_zero3")
    out["hybrid", "fsdp_from_zero3"] = _run("hybrid", f"{hybrid}/fsdp_from_zero3", FSDP)
    _checkpoint_copy(rank, f"{hybrid}/fsdp", 2, f"{hybrid}/zero3_from_fsdp")
    out["hybrid", "zero3_from_fsdp"] = _run("hybrid", f"{hybrid}/zero3_from_fsdp", ZERO[3])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not HAVE_DEEPSPEED:
        pytest.skip(SKIP_REASON)
    root = str(tmp_path_factory.mktemp("deepspeed"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = run_distributed(_all_runs, 2, root, retry_crash=False)
    return root, results


def assert_same_steps(got, ref, steps, rel=1e-4):
    for step in steps:
        assert got[step][0] == pytest.approx(ref[step][0], rel=rel), f"loss at step {step}"
        assert got[step][1] == pytest.approx(ref[step][1], rel=rel), f"grad norm at step {step}"


def assert_close(a, b, tol=1e-4):
    err = ((a - b).norm() / b.norm()).item()
    assert err < tol, f"relative error {err:.2e}"


@needs_deepspeed
@pytest.mark.parametrize("family,stage", [(f, s) for f, stages in RUNS.items() for s in stages])
def test_zero_trains_like_fsdp2(runs, family, stage):
    """Every step's loss and gradient norm (two micro-batches per step, a cosine learning rate),
    the validation loss and the final logits equal FSDP2's."""
    _, results = runs
    ref, ref_logits = results[0][family, "fsdp"]
    got, _ = results[0][family, f"zero{stage}"]
    assert sorted(got, key=str) == sorted(ref, key=str) == [*range(1, STEPS + 1), "val"]
    assert ref[STEPS][0] < ref[1][0]  # it learns
    assert_same_steps(got, ref, range(1, STEPS + 1))
    assert got["val"] == pytest.approx(ref["val"], rel=1e-4)
    for rank_results in results:
        assert_close(rank_results[family, f"zero{stage}"][1], ref_logits)


@needs_deepspeed
@pytest.mark.parametrize("writer,resumed", [("zero3", "fsdp_from_zero3"), ("fsdp", "zero3_from_fsdp")])
def test_checkpoint_resumes_across_engines(runs, writer, resumed):
    """Weights and AdamW moments come through: the other engine's steps 3 and 4 from the writer's
    step 2 are the writer's (ZeRO-3 -> FSDP2 and FSDP2 -> ZeRO-3)."""
    _, results = runs
    ref, ref_logits = results[0]["hybrid", writer]
    got, logits = results[0]["hybrid", resumed]
    assert sorted(got, key=str) == [3, 4, "val"]
    assert_same_steps(got, ref, [3, 4])
    assert_close(logits, ref_logits)


@needs_deepspeed
def test_zero3_checkpoint_loads_in_one_process(runs):
    """The final ZeRO-3 checkpoint in one process (no step left to do): the same logits."""
    root, results = runs
    _, z3_logits = results[0]["hybrid", "zero3"]
    _, logits = _run("hybrid", f"{root}/hybrid/zero3", [])
    torch.testing.assert_close(logits, z3_logits, rtol=1e-5, atol=1e-5)


@needs_deepspeed
def test_deepspeed_format_converts(runs):
    """DeepSpeed's own ZeRO-3 checkpoint (engine.save_checkpoint) -> ours: one process started
    from it (checkpoint.init_from, no step) gives the logits of the run that wrote it."""
    root, results = runs
    _, z3_logits = results[0]["hybrid", "zero3"]
    recipe, overrides = FAMILIES["hybrid"].recipe, list(FAMILIES["hybrid"].overrides)
    assert main(["convert", "from-deepspeed", f"{root}/hybrid/zero3-deepspeed", f"{root}/converted", recipe,
                 *overrides]) == 0
    # refusals are one line and exit 2: an existing output, weights that do not fit the recipe's model
    assert main(["convert", "from-deepspeed", f"{root}/hybrid/zero3-deepspeed", f"{root}/converted", recipe,
                 *overrides]) == 2
    with pytest.raises(ValueError, match="do not fit the model"):
        convert_from_deepspeed(f"{root}/hybrid/zero3-deepspeed", f"{root}/other", load_config(recipe, overrides + [
            "--model.d_model", "48"]))
    run_dir = f"{root}/from_converted"
    cfg = make_config("hybrid", run_dir, ["--checkpoint.init_from", f"{root}/converted", "--training.steps", "1"])
    trainer = Trainer(cfg)
    batch = global_batch(cfg.model.vocab_size)
    with torch.no_grad():
        logits = trainer.model(batch["input_ids"], doc_ids=batch["doc_ids"])
    torch.testing.assert_close(logits, z3_logits, rtol=1e-5, atol=1e-5)


@needs_deepspeed
def test_non_finite_step_is_skipped_like_fsdp2(runs):
    """Step 2 is NaN: both skip it (no update, AdamW's step count unchanged) and go on alike."""
    _, results = runs
    ref, ref_logits = results[0]["transformer", "fsdp_nan"]
    got, logits = results[0]["transformer", "zero2_nan"]
    # metrics.jsonl is strict JSON: a non-finite value is recorded as null
    assert ref[2][0] is None and got[2][0] is None and got[2][1] is None
    assert_same_steps(got, ref, [1, 3, 4])
    clean, _ = results[0]["transformer", "fsdp"]
    assert ref[3][0] != pytest.approx(clean[3][0], rel=1e-4)  # the skip mattered
    assert_close(logits, ref_logits)


def test_deepspeed_layout_is_validated():
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config("tiny", ["--parallel.engine", "deepspeed", "--parallel.tp", "2"])
    with pytest.raises(ConfigError, match="parallel.dp_replicate"):
        load_config("tiny", ["--parallel.engine", "deepspeed", "--parallel.dp_replicate", "2"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config("tiny", ["--parallel.zero_stage", "4"])
