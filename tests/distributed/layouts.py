"""The shared layout harness: every model family through the Trainer under every layout it
supports, against the one-process run, over the whole life of a run (step, validation, save,
resume).

A family is a row of FAMILIES: a recipe, the overrides that make its model tiny, and the layouts
it runs under (keys of LAYOUTS: parallel.* overrides, world size = the product of the degrees).
A new family adds a row, not a process spawn: `run_world` runs every (family, layout) case of one
world size inside the processes of one spawn, one Trainer after another.

    lives = run_distributed(run_world, world, root)   # per rank: {(family, layout): life}
    single = run_life(family, "single", [], root)     # in this process
    check_life([r[family, layout] for r in lives], single, pipelined=is_pipelined(layout))

The life of a case (`run_life`), the same in one process and under a layout:
  1. one step on a fixed global batch (each data-parallel rank takes its rows; documents end inside
     rows): the loss, the gradient norm, the counted labels and every gradient as a whole tensor;
  2. the AdamW step, then a validation on a second fixed batch (the updated weights);
  3. a checkpoint of step 1, resumed by a second Trainer in the same layout: its step, every
     parameter and AdamW moment and its validation loss are those saved.

The checks below the Trainer (tp = 4, sequence parallelism off, every pipeline schedule, the CP
kernels) stay in test_tensor_parallel.py, test_pipeline_parallel.py and test_context_parallel.py,
each with its own table of families run in one spawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from undertow.pretrain.config import load_config
from undertow.pretrain.trainer import Trainer

GLOBAL_BATCH, SEQ = 4, 32
TRAIN_SEED, VAL_SEED = 1234, 4321
DIMS = ("--parallel.pp", "--parallel.dp_replicate", "--parallel.dp_shard", "--parallel.cp", "--parallel.tp")
PP2 = ["--parallel.pp", "2", "--parallel.pp_microbatches", "2"]
LAYOUTS = {
    "fsdp2": ["--parallel.dp_shard", "2"],
    "tp2": ["--parallel.tp", "2"],
    "cp2": ["--parallel.cp", "2"],
    "pp2": PP2,  # 1f1b
    "hsdp2x2": ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"],
    "fsdp2xcp2": ["--parallel.dp_shard", "2", "--parallel.cp", "2"],
    "fsdp2xtp2": ["--parallel.dp_shard", "2", "--parallel.tp", "2"],
    "cp2xtp2": ["--parallel.cp", "2", "--parallel.tp", "2"],
    # pipeline stages sharded by FSDP2, split by TP (sequence-parallel activations cross the stage
    # boundaries), sliced by CP; the interleaved schedules run 4 virtual stages of one block
    "fsdp2xpp2": PP2 + ["--parallel.dp_shard", "2", "--parallel.pp_schedule", "interleaved_1f1b",
                        "--parallel.pp_virtual_stages", "2"],
    "tp2xpp2": PP2 + ["--parallel.tp", "2"],
    "tp2xpp2v": PP2 + ["--parallel.tp", "2", "--parallel.pp_schedule", "zero_bubble", "--parallel.pp_virtual_stages",
                       "2"],
    "cp2xpp2": PP2 + ["--parallel.cp", "2"],
    # expert parallelism: the MoE experts split over the dp_shard x cp ranks (FSDP2 shards the rest)
    "ep2": ["--parallel.dp_shard", "2", "--parallel.ep", "2"],
    "ep4": ["--parallel.dp_shard", "4", "--parallel.ep", "4"],
    "hsdp2x2xep2": ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2", "--parallel.ep", "2"],
    "ep2xtp2": ["--parallel.dp_shard", "2", "--parallel.ep", "2", "--parallel.tp", "2"],
    "ep4xcp2": ["--parallel.dp_shard", "2", "--parallel.cp", "2", "--parallel.ep", "4"],
    # ep below dp_shard x cp: two groups of ep 2, each rank storing 1 of the 4 experts (gathered in its group)
    "ep2of4": ["--parallel.dp_shard", "4", "--parallel.ep", "2"],
    "ep2xcp2": ["--parallel.dp_shard", "2", "--parallel.cp", "2", "--parallel.ep", "2"],
    # pipeline stages (1f1b) sharded by FSDP2
    "pp2xfsdp2": PP2 + ["--parallel.dp_shard", "2"],
    # each pipeline stage's MoE layers split over the stage's dp_shard ranks
    "ep2xpp2": PP2 + ["--parallel.dp_shard", "2", "--parallel.ep", "2"],
}
# what every family runs: each parallelism alone and the two that split the model, together (two
# stages: a model of two blocks runs them all)
STANDARD = ("fsdp2", "tp2", "cp2", "pp2", "tp2xpp2")
# every layout a model without MoE layers can take (expert parallelism needs experts)
DENSE = tuple(name for name, overrides in LAYOUTS.items() if "--parallel.ep" not in overrides)


@dataclass(frozen=True)
class Family:
    recipe: str
    overrides: tuple[str, ...]  # small shapes of the recipe's model
    layouts: tuple[str, ...]  # keys of LAYOUTS
    # the loss depends on how the step's rows are grouped into forwards: pipelined layouts are checked
    # against one process that runs the same micro-batches (`pipeline_micro_batches`)
    pipelined_reference: bool = False


MAMBA_SMALL = ("--model.d_model", "32", "--model.d_state", "8")
SSD_SMALL = ("--model.headdim", "16", "--model.chunk_size", "8", "--model.ngroups", "2")
FAMILIES = {
    "transformer": Family("tiny", ("--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2"),
                          STANDARD),
    "mamba1": Family("tiny-mamba", MAMBA_SMALL + ("--model.layer_pattern", "mm"), STANDARD),
    "mamba2": Family("tiny-mamba2", MAMBA_SMALL + SSD_SMALL + ("--model.layer_pattern", "MM"), STANDARD),
    # one block of each mixer kind, under every layout (the other combinations on it alone: 4 processes
    # cost the most)
    "hybrid": Family("tiny-hybrid", MAMBA_SMALL + SSD_SMALL + ("--model.layer_pattern", "mM*-"), DENSE),
    # the xLSTM-7B block: heads of 8 (q, k) and 16 (v) channels, chunks that split the 32-token rows
    "xlstm": Family("tiny-xlstm", ("--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2",
                                   "--model.chunk_size", "8"), STANDARD),
    # the paper's blocks: sLSTM (serial state passing under cp) and the pre-up-projection mLSTM; under
    # tp (with sequence parallelism) each rank runs 2 of the 4 heads of each (models/xlstm/plan.py),
    # also under cp (the sLSTM state of a rank's heads passed serially)
    "xlstm-paper": Family("tiny-xlstm-hybrid", ("--model.d_model", "32", "--model.n_layers", "2", "--model.layer_pattern",
                                                "sM", "--model.chunk_size", "8"), STANDARD + ("cp2xtp2",)),
    # one ParaGRU and one ParaLSTM block (TP by channel groups: one head of 16 channels per rank);
    # Newton scans of 8-token chunks; under cp the Newton systems span the ranks (kernels/pararnn/context.py)
    "pararnn": Family("tiny-paragru", ("--model.d_model", "32", "--model.layer_pattern", "gl", "--model.heads", "2",
                                       "--model.chunk_size", "8"), ("fsdp2", "tp2", "cp2", "pp2", "tp2xpp2")),
    # heads = 1: the dense input projection B split by output channel (the convolved channels
    # all-gathered before it, the one norm group's mean square all-reduced; models/pararnn/plan.py)
    "pararnn-dense": Family("tiny-paragru", ("--model.d_model", "32", "--model.layer_pattern", "gl", "--model.heads",
                                             "1", "--model.chunk_size", "8"), ("tp2",)),
    # the MoE transformer with the RMoE router (4 experts top-2, GRU width 8): tp splits the
    # experts' width; under pp the router state crosses the stage boundary and the shared GRU's gradients
    # are summed over the stages. The router losses (Switch load balance, z) are statistics of a
    # forward's tokens on every dp/cp rank (models/moe/balance.py): the same under every layout that
    # runs the step's rows in one forward; pp runs them as 2 micro-batches, checked against one
    # process that does too (`pipelined_reference`). Under pp x dp/cp (pp2xfsdp2, cp2xpp2, ep2xpp2)
    # the GRU, in no stage module, is replicated and its gradients averaged by hand (parallel/pipeline_shared.py).
    # ep2 / ep4: 2 or 1 of the 4 experts per rank, tokens exchanged by all-to-all; under HSDP the
    # dp_replicate ranks hold the same experts and sum their gradients; under tp (tp2, ep2xtp2) each
    # tp rank holds half of every expert's width (partial outputs summed over tp; fsdp2xtp2: FSDP2
    # shards those halves like any tensor-parallel weight, ep = 1); under cp the
    # experts are split over dp_shard x cp; ep2of4 / ep2xcp2: two ep groups of 2 over 4 ranks
    "moe": Family("tiny-rmoe", ("--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2",
                                "--model.n_kv_heads", "2", "--model.moe.n_experts", "4",
                                "--model.moe.expert_hidden", "16", "--model.moe.router_dim", "8",
                                "--model.moe.aux_loss_coef", "0.1"),
                  ("fsdp2", "tp2", "pp2", "tp2xpp2", "ep2", "ep4", "hsdp2x2xep2", "ep2xtp2", "ep4xcp2", "ep2of4",
                   "ep2xcp2", "pp2xfsdp2", "cp2xpp2", "ep2xpp2", "fsdp2xtp2"),
                  pipelined_reference=True),
    # recurrence in depth at a fixed depth draw (depth_distribution fixed: 3 core steps, the last 2
    # with gradients; a drawn depth is the same on every rank too, seeded by the step): Huginn's
    # prelude / looped core / coda as three pipeline layers, and the Universal Transformer's ACT
    # loop (one layer: no pp); under tp the loop runs on whole tensors, its matmuls split by head
    "depth-huginn": Family("tiny-depth", ("--model.d_model", "32", "--model.n_heads", "2", "--model.ffn_hidden", "48",
                                          "--model.n_core", "1", "--model.depth_distribution", "fixed",
                                          "--model.mean_depth", "3", "--model.backprop_depth", "2"),
                           STANDARD),
    "depth-ut": Family("tiny-ut", ("--model.d_model", "32", "--model.n_heads", "2", "--model.ffn_hidden", "48",
                                   "--model.max_steps", "3"), ("fsdp2", "tp2", "cp2")),
    # Titans MAC (2-layer MLP memory of 2 heads, chunks of 4, segments of 16; the documents start
    # inside chunks and segments); tp by attention and memory heads; cp passes the memory state rank
    # to rank (one segment per rank), also with tp
    "titans": Family("tiny-titans-mac", ("--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2",
                                         "--model.mem_heads", "2", "--model.chunk_size", "4", "--model.segment_len",
                                         "16", "--model.window", "16", "--model.persistent_tokens", "2"),
                     ("fsdp2", "tp2", "cp2", "pp2", "tp2xpp2", "cp2xtp2")),
}


def world_size(layout: list[str]) -> int:
    """The processes a list of parallel.* overrides needs."""
    world = 1
    for name, value in zip(layout[::2], layout[1::2]):
        world *= int(value) if name in DIMS else 1
    return world


def is_pipelined(layout: str) -> bool:
    return "--parallel.pp" in LAYOUTS[layout]


def cases(world: int | None = None) -> list[tuple[str, str]]:
    """Every (family, layout) the rows ask for (of `world` processes, when given)."""
    return [(family, layout) for family, row in FAMILIES.items() for layout in row.layouts
            if world in (None, world_size(LAYOUTS[layout]))]


def make_config(family: str, run_dir: str, extra: list[str]):
    row = FAMILIES[family]
    return load_config(row.recipe, list(row.overrides) + [
        "--training.run_dir", run_dir, "--data.seq_len", str(SEQ), "--training.micro_batch_size", "2",
        "--training.val_every", "0", "--logging.tensorboard", "false", "--data.num_workers", "0",
        "--schedule.warmup_steps", "0", *extra,
    ])


def global_batch(vocab: int, seed: int = TRAIN_SEED) -> dict:
    """A fixed batch (GLOBAL_BATCH, SEQ) with document boundaries inside rows, the same in every process."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    doc_ids = ((torch.arange(SEQ) >= 11).int() + (torch.arange(SEQ) >= 25).int()).expand(GLOBAL_BATCH, SEQ)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(), "doc_ids": doc_ids.clone()}


def rows_of(trainer: Trainer, batch: dict) -> dict:
    """This data-parallel rank's rows of a global batch."""
    per_rank = GLOBAL_BATCH // trainer.dims.dp
    start = trainer.dp_rank * per_rank
    return {k: v[start:start + per_rank] for k, v in batch.items()}


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective over its mesh), a plain tensor as it is; detached copies."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_grads(model) -> dict:
    return {name: whole(p.grad) for name, p in model.named_parameters()}


def trained_state(trainer: Trainer) -> dict[str, list[torch.Tensor]]:
    """name -> [parameter, AdamW exp_avg, exp_avg_sq] of this rank's parameters, whole tensors."""
    state = {}
    for name, p in trainer.model.named_parameters():
        moments = trainer.optimizer.state[p]
        state[name] = [whole(p), whole(moments["exp_avg"]), whole(moments["exp_avg_sq"])]
    return state


def advance(trainer: Trainer) -> None:
    """The AdamW step after trainer.train_step, as Trainer.fit takes it."""
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1


def save_and_resume(trainer: Trainer, cfg) -> tuple[Trainer, list[str]]:
    """Save `trainer`, then restart: a new Trainer of `cfg` (checkpoint.resume = auto, the same
    run_dir and layout) resumes the checkpoint. Returns it and the names whose parameter or AdamW
    moments differ from the saved ones (or exist on one side only)."""
    trainer.save()
    saved = trained_state(trainer)
    resumed = Trainer(cfg)
    restored = trained_state(resumed)
    differ = [name for name in saved.keys() | restored.keys() if name not in saved or name not in restored
              or not all(map(torch.equal, saved[name], restored[name]))]
    return resumed, sorted(differ)


def pipeline_forwards(layout: list[str]) -> tuple[int, int]:
    """(pipeline micro-batches, data-parallel ranks) of a layout: how it groups the step's rows into forwards."""
    values = dict(zip(layout[::2], layout[1::2]))
    dp = int(values.get("--parallel.dp_replicate", 1)) * int(values.get("--parallel.dp_shard", 1))
    return int(values.get("--parallel.pp_microbatches", 1)), dp


def pipeline_micro_batches(batch: dict, forwards: tuple[int, int]) -> list[dict]:
    """The global batch as one process's micro-batches, grouped as `forwards` = (micro-batches M, dp
    ranks) groups them: each dp rank's rows are split into M consecutive micro-batches (as the pipeline
    schedule splits them), and micro-batch m runs the m-th of every dp rank together."""
    M, dp = forwards
    per = GLOBAL_BATCH // dp // M
    starts = [[r * (GLOBAL_BATCH // dp) + m * per for r in range(dp)] for m in range(M)]
    return [{k: torch.cat([v[s:s + per] for s in group]) for k, v in batch.items()} for group in starts]


def run_life(family: str, layout_name: str, layout: list[str], root: str, forwards: tuple[int, int] | None = None
             ) -> dict:
    """Step, AdamW step, validation, save and resume of one family under one layout (module docstring).
    One process of a `pipelined_reference` row also lives its life in the micro-batches of each of its
    pipelined layouts (life["pipelined"][pipeline_forwards(layout)]); `forwards` runs one of those."""
    life = {}
    if not layout and forwards is None and FAMILIES[family].pipelined_reference:
        keys = {pipeline_forwards(LAYOUTS[name]) for name in FAMILIES[family].layouts if is_pipelined(name)}
        life["pipelined"] = {key: run_life(family, f"{layout_name}-mb{key[0]}dp{key[1]}", layout, root, key)
                             for key in sorted(keys)}
    args = (family, f"{root}/{family}-{layout_name}", layout + ["--checkpoint.resume", "auto"])
    trainer = Trainer(make_config(*args))
    vocab = trainer.cfg.model.vocab_size
    batch = global_batch(vocab)
    micro = pipeline_micro_batches(batch, forwards) if forwards else [rows_of(trainer, batch)]
    loss, grad_norm, n_labels = trainer.train_step(micro)
    life |= {"loss": loss, "grad_norm": grad_norm, "n_labels": n_labels, "grads": full_grads(trainer.model)}
    if trainer.pipeline is not None:
        life["forwards"] = (trainer.pipeline.microbatches, trainer.dims.dp)
    advance(trainer)
    val_batches = [rows_of(trainer, global_batch(vocab, VAL_SEED))]
    life["val"] = trainer.validate(val_batches)
    resumed, life["not_restored"] = save_and_resume(trainer, make_config(*args))
    life["resumed_step"] = resumed.step
    life["resumed_val"] = resumed.validate(val_batches)
    return life


def run_world(rank: int, world: int, root: str) -> dict:
    """Every case of `world` processes, one after another (in one spawn: starting processes is the slow part)."""
    lives = {}
    for family, layout in cases(world):
        try:
            lives[family, layout] = run_life(family, layout, LAYOUTS[layout], root)
        except Exception as error:
            error.add_note(f"in the layout case {family} x {layout}")
            raise
    return lives


def check_resumed(life: dict) -> None:
    assert life["resumed_step"] == 1
    assert life["not_restored"] == []  # every parameter and moment exactly as saved
    assert life["resumed_val"] == life["val"]


def check_life(per_rank: list[dict], single: dict, pipelined: bool) -> None:
    """Every rank's life equals the one-process life: loss, gradient norm, every gradient (a
    pipeline rank holds its stages' only; together they hold all), the validation loss after the
    AdamW step; and each resumed its own checkpoint exactly."""
    if pipelined and "pipelined" in single:  # a row whose loss depends on the forwards' rows
        single = single["pipelined"][per_rank[0]["forwards"]]
    check_resumed(single)
    seen = set()
    for life in per_rank:
        assert life["n_labels"] == single["n_labels"] == GLOBAL_BATCH * SEQ
        assert life["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert life["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
        if not pipelined:
            assert life["grads"].keys() == single["grads"].keys()
        for name, g in life["grads"].items():
            ref = single["grads"][name]
            err = ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            assert err < 1e-4, f"{name}: relative error {err:.2e}"
            seen.add(name)
        assert life["val"] == pytest.approx(single["val"], rel=1e-5)
        check_resumed(life)
    assert seen == single["grads"].keys()


class Once(dict):
    """key -> compute(key), computed on first use (a spawn per world size only when a test needs it).
    A compute that fails is not run again: every later test of that key fails with its error. (A rerun
    would find the first attempt's checkpoints in the same run directories, resume them and compare
    trained weights with fresh ones: in CI, after a 4-process spawn failed, every 4-process case then
    failed on a wrong loss instead of the spawn's error.)"""

    def __init__(self, compute):
        super().__init__()
        self.compute = compute
        self.failed: dict = {}

    def __missing__(self, key):
        if key in self.failed:
            raise AssertionError(f"the earlier computation of {key!r} failed (its test shows why)") from self.failed[key]
        try:
            value = self.compute(key)
        except BaseException as error:
            self.failed[key] = error
            raise
        self[key] = value
        return value
