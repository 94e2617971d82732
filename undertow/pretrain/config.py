"""The experiment config: typed sections loaded from a TOML recipe plus dotted CLI overrides.

A recipe is `undertow/recipes/NAME.toml` (used by name) or any `.toml` path. The `[model]`
table names its family (`family = "transformer"`); the other keys belong to that family's
config dataclass from the registry. Everything is validated here, before any work.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from undertow.configtools import ConfigError, check, opt, coerce, from_dict, parse_overrides, set_dotted
from undertow.log import get_logger
from undertow.models import registry
from undertow.parallel.expert_layout import expert_count_problem, expert_layout_problem

DEFAULT_RECIPE = "tiny"
# An AdamW learning rate above this is a typo (a missing minus in 1e-3, or a unit mix-up), not a choice:
# each step moves every weight by about lr, so it ruins the weights on the first step.
MAX_LR = 10.0


def finite(value: Any) -> bool:
    """True for a finite number; NaN and +-inf are never a valid setting (comparisons with NaN are
    all False, but inf passes `> 0`, so every float field checks this first)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class DataConfig:
    sources: list[str] = opt(factory=lambda: ["embedded"], help='Token data: `embedded` (the corpus shipped in the package, prepared on first use), a shard directory with manifest.json, a path/glob/brace pattern of .tar shards, `pipe:CMD`, or `megatron:PREFIX` for a .bin/.idx dataset.')
    weights: list[float] = opt(factory=list, help='Blending weights, one per source (empty: equal).')
    seq_len: int = opt(256, help="Tokens per training row; documents are packed into rows with their boundaries kept.")
    val_fraction: float = opt(0.0, help="Fraction of documents held out for validation (stable hash of each document's key).")
    num_workers: int = opt(0, help='DataLoader worker processes per rank (0: load in the training process).')
    seed: int = opt(1234, help="Seed of the data order (shard and document shuffling, blending).")
    interleave: int = opt(16, help="Documents each reader reads at once per source: row r of a reader comes from the r % N-th, so the rows of a batch come from different documents and a long document is spread over many batches instead of filling consecutive ones (1: one document after another).")
    embedded_vocab_size: int = opt(2048, help='Vocabulary of the tokenizer trained on the embedded corpus.')

    def validate(self) -> None:
        check(len(self.sources) > 0, "data.sources", self.sources, "give at least one source")
        check(
            not self.weights or len(self.weights) == len(self.sources),
            "data.weights",
            self.weights,
            f"give one weight per source ({len(self.sources)}) or none",
        )
        check(all(finite(w) and w > 0 for w in self.weights), "data.weights", self.weights,
              "weights must be finite numbers > 0")
        check(self.seq_len >= 2, "data.seq_len", self.seq_len, "must be >= 2")
        check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in [0, 1)")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        check(self.interleave >= 1, "data.interleave", self.interleave, "must be >= 1 (1: no interleaving)")
        check(
            32 <= self.embedded_vocab_size <= 65536,
            "data.embedded_vocab_size",
            self.embedded_vocab_size,
            "must be in [32, 65536]",
        )


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = opt("adamw", help="Optimizer (AdamW).")
    lr: float = opt(1e-3, help="Peak learning rate.")
    weight_decay: float = opt(0.1, help='Applied to matrices (2-D and up); norms, biases and embeddings are not decayed.')
    betas: list[float] = opt(factory=lambda: [0.9, 0.95], help="AdamW beta1, beta2.")
    eps: float = opt(1e-8, help="AdamW epsilon.")
    fused: Literal["auto", "on", "off"] = opt("auto", help="Fused AdamW kernel: auto uses it on CUDA and CPU.")

    def validate(self) -> None:
        check(finite(self.lr) and 0 < self.lr <= MAX_LR, "optimizer.lr", self.lr,
              f"a finite number in (0, {MAX_LR:g}] (AdamW peak rates are typically 1e-4 to 1e-2)")
        check(finite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay,
              "a finite number >= 0")
        # AdamW decays decoupled: every step multiplies the weights by (1 - lr * weight_decay)
        check(self.lr * self.weight_decay < 1, "optimizer.weight_decay", self.weight_decay,
              f"lr * weight_decay must be < 1 (with optimizer.lr = {self.lr:g}, weight_decay < {1 / self.lr:g}); "
              "at 1 or more every step zeroes or flips the sign of the weights")
        check(
            len(self.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        check(finite(self.eps) and 0 < self.eps < 1, "optimizer.eps", self.eps, "a finite number in (0, 1), e.g. 1e-8")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = opt("cosine", help='cosine: warmup then cosine to min_lr_ratio; wsd: warmup, stable, then linear decay over decay_fraction of the steps; constant: warmup then flat.')
    warmup_steps: int = opt(100, help="Linear warmup steps (more than training.steps: clamped to it, with a warning, so short trials of a recipe need no second override).")
    min_lr_ratio: float = opt(0.1, help="Final learning rate as a fraction of the peak (cosine, wsd).")
    decay_fraction: float = opt(0.2, help="wsd: fraction of all steps spent in the final linear decay.")

    def validate(self) -> None:
        check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(0 < self.decay_fraction <= 1, "schedule.decay_fraction", self.decay_fraction, "must be in (0, 1]")


@dataclass
class TrainingConfig:
    steps: int = opt(300, help="Optimizer steps in all (a resumed run continues up to this).")
    micro_batch_size: int = opt(8, help="Rows per forward/backward pass.")
    grad_accum_steps: int = opt(1, help="Micro-batches per optimizer step (loss averaged over all their tokens).")
    seed: int = opt(0, help="Seed of parameter initialization and every torch RNG.")
    device: str = opt("auto", help='auto (cuda if available, else cpu), cpu, cuda, cuda:N.')
    dtype: Literal["auto", "float32", "bfloat16"] = opt("auto", help='Autocast dtype: auto = bfloat16 on CUDA, float32 on CPU. Parameters stay float32.')
    grad_clip: float = opt(1.0, help='Clip the global gradient norm to this (0: measure it, do not clip).')
    activation_checkpointing: bool = opt(False, help="Recompute each block's activations in the backward pass.")
    compile: bool = opt(False, help="torch.compile each block.")
    fused_loss: bool = opt(True, help="The LM head's cross-entropy in chunks of tokens, its gradients taken at once, never building the (tokens, vocab) logits (models/common/fused_loss.py); off, or under tensor or pipeline parallelism: the logits, then the loss.")
    max_bad_steps: int = opt(5, help='Consecutive non-finite steps (skipped) that stop the run.')
    max_param_growth: float = opt(10.0, help="Stop the run when one optimizer step makes the parameters non-finite or multiplies their global norm by more than this (a blow-up: a healthy step changes it by a few percent at most); 0: check finiteness only.")
    val_every: int = opt(100, help="Validate every N steps and at the end (0: never; needs data.val_fraction > 0).")
    val_batches: int = opt(8, help="Validation batches per evaluation (at most one pass over the held-out documents).")
    run_dir: str = opt("runs/{name}", help="Where checkpoints, TensorBoard events and metrics.jsonl go; {name} is the config's name.")
    peak_tflops: float = opt(0.0, help='Peak dense TFLOP/s of one device for MFU (0: known GPUs auto-detected, else MFU not shown).')
    deterministic: bool = opt(True, help='Use deterministic algorithms (bit-identical resume on CPU).')
    collective_timeout_s: float = opt(600.0, help="Timeout of every collective (the process group's): a rank that never joins one makes the others fail after this long, and the failure is logged with the rank, the operation, the step and the phase.")
    hang_timeout_s: float = opt(1800.0, help="A rank that stays this long in one phase of a step (train step, validation, checkpoint save) is reported (rank, step, phase, the collective it waits in, every thread's stack) and exits with code 124 (0: no watchdog).")

    def validate(self) -> None:
        check(self.steps >= 1, "training.steps", self.steps, "must be >= 1")
        check(self.micro_batch_size >= 1, "training.micro_batch_size", self.micro_batch_size, "must be >= 1")
        check(self.grad_accum_steps >= 1, "training.grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        check(finite(self.grad_clip) and self.grad_clip >= 0, "training.grad_clip", self.grad_clip,
              "a finite number > 0 (the norm to clip to), or 0 to measure without clipping")
        check(self.max_bad_steps >= 1, "training.max_bad_steps", self.max_bad_steps, "must be >= 1")
        check(finite(self.max_param_growth) and (self.max_param_growth == 0 or self.max_param_growth > 1),
              "training.max_param_growth", self.max_param_growth, "a finite number > 1, or 0 (finiteness only)")
        check(self.val_every >= 0, "training.val_every", self.val_every, "must be >= 0 (0: no validation)")
        check(self.val_batches >= 1, "training.val_batches", self.val_batches, "must be >= 1")
        check(finite(self.peak_tflops) and self.peak_tflops >= 0, "training.peak_tflops", self.peak_tflops,
              "a finite number >= 0")
        check(finite(self.collective_timeout_s) and self.collective_timeout_s > 0, "training.collective_timeout_s",
              self.collective_timeout_s, "a finite number of seconds > 0")
        check(finite(self.hang_timeout_s) and self.hang_timeout_s >= 0, "training.hang_timeout_s",
              self.hang_timeout_s, "a finite number of seconds >= 0 (0: off)")
        dev = self.device
        check(
            dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
            "training.device",
            dev,
            "auto, cpu, cuda or cuda:N",
        )


@dataclass
class CheckpointConfig:
    every: int = opt(100, help='Save every N steps (0: only at the end); the last step is always saved.')
    keep_last: int = opt(3, help="Complete checkpoints kept; older ones are deleted after a successful save.")
    resume: str = opt("auto", help='auto: resume from the newest complete checkpoint if there is one; none: start fresh (refused if the run directory already has checkpoints); or a checkpoint directory.')
    dir: str = opt("", help='Defaults to RUN_DIR/checkpoints.')
    init_from: str = opt(
        "",
        help="Start a new run from the model weights (and model config) of this checkpoint directory, e.g. one "
        "written by `undertow convert from-hf`, with a fresh optimizer at step 0; ignored once the run has "
        "checkpoints of its own.",
    )
    verify: Literal["sha256", "size", "off"] = opt(
        "sha256",
        help="Before loading a checkpoint (resume, init_from), check its files against the manifest saved with it: "
        "sha256 (sizes and checksums), size (sizes only: cheaper, misses altered bytes) or off. A damaged "
        "checkpoint is set aside (renamed step_N.damaged-REASON) and resume=auto falls back to the previous one.",
    )

    def validate(self) -> None:
        check(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")
        check(
            self.resume in ("auto", "none") or os.path.isdir(self.resume),
            "checkpoint.resume",
            self.resume,
            "auto, none, or an existing checkpoint directory",
        )
        check(
            not self.init_from or os.path.isfile(os.path.join(self.init_from, "meta.json")),
            "checkpoint.init_from",
            self.init_from,
            "a complete checkpoint directory (one holding meta.json)",
        )


@dataclass
class LoggingConfig:
    every: int = opt(10, help='Console line and TensorBoard scalars every N steps.')
    tensorboard: bool = opt(True, help="Write TensorBoard event files under RUN_DIR/tb.")

    def validate(self) -> None:
        check(self.every >= 1, "logging.every", self.every, "must be >= 1")


@dataclass
class ParallelConfig:
    """Parallel layout: pp x dp_replicate x dp_shard x cp x tp must equal the number of processes
    (torchrun's WORLD_SIZE); see docs/parallelism.md."""

    tp: int = opt(1, help="Tensor-parallel degree (heads/channels split over tp ranks, sequence parallel between blocks).")
    pp: int = opt(1, help="Pipeline-parallel stages.")
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b", "zero_bubble", "zbv"] = opt("1f1b", help="pp > 1: the pipeline schedule (torch.distributed.pipelining): 1f1b, gpipe, interleaved_1f1b (pp_virtual_stages per rank), zero_bubble (interleaved, backward split into input and weight gradients), zbv (zero bubble in a V, 2 stages per rank); see docs/parallelism.md.")
    pp_microbatches: int = opt(0, help="pp > 1: pipeline micro-batches per step; the step's rows (grad_accum_steps x micro_batch_size) are split into this many (0: grad_accum_steps, one per loader micro-batch).")
    pp_virtual_stages: int = opt(1, help="pp > 1: stages per rank (interleaved_1f1b and zero_bubble: >= 1, each rank runs every pp-th stage; zbv: 2).")
    pp_activation_gib: float = opt(0.0, help="pp > 1, automatic split: the most saved-activation memory (GiB) a stage may hold at its peak (its in-flight micro-batches x the bytes its layers keep for the backward, measured on the meta device at start-up); the compute-balanced split is chosen among those that fit. 0: balance compute only.")
    pp_split: list[int] = opt(factory=list, help="pp > 1: layers per stage, pp x pp_virtual_stages counts summing to the model's layers (empty: balanced by the family's per-layer cost, the embedding on the first stage and the LM head on the last counted).")
    cp: int = opt(1, help="Context-parallel degree (the sequence split over cp ranks).")
    dp_shard: int = opt(1, help="Sharded data-parallel degree (FSDP2: parameters, gradients and optimizer states sharded).")
    dp_replicate: int = opt(1, help="Replicated data-parallel degree (with dp_shard > 1: HSDP).")
    ep: int = opt(1, help="Expert-parallel degree: each MoE layer's experts split over ep of the dp_shard x cp ranks (ep divides dp_shard x cp, which must divide model.moe.n_experts; adds no processes), tokens exchanged by all-to-all within each group of ep ranks; see docs/parallelism.md.")
    engine: Literal["fsdp", "deepspeed"] = opt("fsdp", help="Data-parallel engine: fsdp (FSDP2/HSDP over dp_shard x dp_replicate) or deepspeed (ZeRO over the dp_shard ranks; needs `pip install 'undertow[deepspeed]'`, tp = pp = cp = 1 and dp_replicate = 1; see docs/parallelism.md).")
    zero_stage: Literal[1, 2, 3] = opt(3, help="engine = deepspeed: ZeRO stage; 1 shards optimizer states, 2 also gradients, 3 also parameters (what FSDP2 shards).")
    zero_offload: bool = opt(False, help="engine = deepspeed: keep optimizer states (and with zero_stage = 3 the parameters) in CPU memory; the optimizer step runs on the CPU.")

    def validate(self) -> None:
        for name in ("tp", "pp", "cp", "dp_shard", "dp_replicate"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"parallel.{name}", value, "an integer >= 1")
        problem = expert_layout_problem(self)
        if problem:
            raise ConfigError(problem)
        check(isinstance(self.pp_microbatches, int) and self.pp_microbatches >= 0, "parallel.pp_microbatches",
              self.pp_microbatches, "an integer >= 0 (0: training.grad_accum_steps)")
        check(isinstance(self.pp_virtual_stages, int) and self.pp_virtual_stages >= 1, "parallel.pp_virtual_stages",
              self.pp_virtual_stages, "an integer >= 1")
        if self.pp_schedule == "zbv":
            check(self.pp_virtual_stages == 2, "parallel.pp_virtual_stages", self.pp_virtual_stages,
                  "2 with parallel.pp_schedule = zbv (two stages per rank, in a V)")
        elif self.pp_schedule in ("1f1b", "gpipe"):
            check(self.pp_virtual_stages == 1, "parallel.pp_virtual_stages", self.pp_virtual_stages,
                  f"1 with parallel.pp_schedule = {self.pp_schedule} (interleaved_1f1b or zero_bubble run more)")
        check(finite(self.pp_activation_gib) and self.pp_activation_gib >= 0,
              "parallel.pp_activation_gib", self.pp_activation_gib, "a number >= 0 (0: balance compute only)")
        check(all(isinstance(k, int) and k >= 1 for k in self.pp_split), "parallel.pp_split", self.pp_split,
              "layer counts >= 1, one per stage (or [] for the automatic split)")
        if self.pp_split:
            stages = self.pp * self.pp_virtual_stages
            check(len(self.pp_split) == stages, "parallel.pp_split", self.pp_split,
                  f"{stages} counts (pp x pp_virtual_stages), or [] for the automatic split")
        if self.engine == "deepspeed":
            for name in ("tp", "pp", "cp", "dp_replicate", "ep"):
                value = getattr(self, name)
                check(value == 1, f"parallel.{name}", value,
                      "1 with parallel.engine = deepspeed (ZeRO is data parallel only in this version; use engine = fsdp)")
            check(importlib.util.find_spec("deepspeed") is not None, "parallel.engine", self.engine,
                  "fsdp, or install DeepSpeed: pip install 'undertow[deepspeed]'")


@dataclass
class ExperimentConfig:
    name: str = opt("tiny", help="Run name (defaults to the recipe's file name); used in training.run_dir.")
    model: Any = opt(None, help="The family's config dataclass (see models/registry.py).")
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def family(self) -> str:
        return registry.family_of(self.model)

    @property
    def run_dir(self) -> str:
        return self.training.run_dir.replace("{name}", self.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    def validate(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        for section in (self.data, self.optimizer, self.schedule, self.training, self.checkpoint, self.logging):
            section.validate()
        self.parallel.validate()
        self.model.validate()
        if self.parallel.ep > 1:  # E split over ep ranks: the model needs MoE layers of E divisible by ep
            moe = getattr(self.model, "moe", None)
            experts = moe.n_experts if moe is not None else 0
            check(experts > 0, "parallel.ep", self.parallel.ep,
                  f"1 (model {self.family!r} has no MoE layers (model.moe.n_experts = {experts}): expert parallelism splits experts)")
            valid = ", ".join(str(d) for d in range(1, experts + 1) if experts % d == 0)
            check(experts % self.parallel.ep == 0, "parallel.ep", self.parallel.ep,
                  f"a divisor of model.moe.n_experts = {experts} (valid: {valid})")
            problem = expert_count_problem(self.parallel, experts)  # every dp_shard x cp rank stores E / (dp_shard x cp)
            check(problem is None, "parallel.ep", self.parallel.ep, problem)
        if self.schedule.warmup_steps > self.training.steps:  # a short trial of a long recipe: one line, no error
            get_logger("pretrain.config").warning(
                "schedule.warmup_steps = %d > training.steps = %d: warming up over all %d steps",
                self.schedule.warmup_steps, self.training.steps, self.training.steps)
            self.schedule.warmup_steps = self.training.steps
        p = self.parallel
        if p.pp > 1:
            self._check_pipeline_microbatches()
        if p.pp > 1 and p.pp_schedule == "zbv" and p.dp_shard * p.dp_replicate * p.cp > 1:
            check(not getattr(self.model, "tie_embeddings", False), "model.tie_embeddings", True,
                  "false with parallel.pp_schedule = zbv and FSDP (dp_shard, dp_replicate or cp > 1): the V puts "
                  "the embedding and the head on one rank in two stages, and FSDP cannot shard one weight in both "
                  "(or use 1f1b, gpipe, interleaved_1f1b or zero_bubble)")

    def layout_limits(self) -> list[tuple[str, str, int]]:
        """(degree, what it splits, size) for ParallelDims.validate: the family's shape limits, and the
        row length that context and sequence parallelism split."""
        spec = registry.get(self.family)
        limits = list(spec.shape_limits(self.model)) if spec.shape_limits else []
        if self.parallel.tp > 1:  # sequence parallel splits each cp slice of a row over the tp ranks
            limits.append(("tp", "seq_len / cp", self.data.seq_len // self.parallel.cp))
        if self.parallel.cp > 1:
            limits.append(("cp", "seq_len", self.data.seq_len))
            if hasattr(self.model, "context_limits"):  # a family whose cp slices must hold whole chunks/segments
                limits += self.model.context_limits(self.data.seq_len)
        return limits

    def _check_pipeline_microbatches(self) -> None:
        """What the pipeline schedules need of the micro-batch count, checked before any process starts
        (torch.distributed.pipelining would raise it in every rank, mid-launch)."""
        p, t = self.parallel, self.training
        n = p.pp_microbatches or t.grad_accum_steps
        what = f"parallel.pp_microbatches = {p.pp_microbatches}" if p.pp_microbatches else \
            f"training.grad_accum_steps = {t.grad_accum_steps} (pipeline micro-batches, as parallel.pp_microbatches = 0)"
        rows = t.grad_accum_steps * t.micro_batch_size
        check(n <= rows, "parallel.pp_microbatches", n,
              f"{what}: a step holds {rows} rows (grad_accum_steps x micro_batch_size), one per micro-batch at "
              f"least; use --parallel.pp_microbatches {max(1, min(rows, p.pp))} or more rows")
        if p.pp_schedule == "1f1b":  # torch's Schedule1F1B: at least one micro-batch per stage
            check(n >= p.pp, "parallel.pp_microbatches", n,
                  f"{what}: the 1f1b schedule needs at least one micro-batch per stage ({p.pp}); "
                  f"use --parallel.pp_microbatches {p.pp}" + ("" if p.pp <= rows else
                                                              f" with at least {p.pp} rows per step"))
        elif p.pp_schedule in ("interleaved_1f1b", "zero_bubble"):
            rounds = max(1, n // p.pp)
            check(n % rounds == 0, "parallel.pp_microbatches", n,
                  f"{what}: {p.pp_schedule} needs a multiple of pp = {p.pp} micro-batches (or fewer than "
                  f"{2 * p.pp}); use --parallel.pp_microbatches {rounds * p.pp}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = {"family": self.family, **dataclasses.asdict(self.model)}
        return out


def recipe_path(recipe: str) -> str:
    """A recipe name shipped in the package, or a path to a TOML file."""
    if recipe.endswith(".toml") or os.sep in recipe:
        if not os.path.isfile(recipe):
            raise ConfigError(f"recipe file {recipe!r} does not exist")
        return recipe
    shipped = resources.files("undertow.recipes").joinpath(f"{recipe}.toml")
    if not shipped.is_file():
        raise ConfigError(f"unknown recipe {recipe!r}; shipped recipes: {available_recipes()} (or give a .toml path)")
    return str(shipped)


def available_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("undertow.recipes").iterdir() if p.name.endswith(".toml"))


def build_model_config(table: dict) -> Any:
    """A `[model]` table (`family` plus that family's fields) -> the family's config dataclass."""
    table = dict(table)
    family = coerce("model.family", table.pop("family", "transformer"), str)
    spec = registry.get(family, field_name="model.family")
    return from_dict(spec.config_cls, table, "model")


def build_config(data: dict) -> ExperimentConfig:
    """Dict (parsed TOML with overrides applied) -> validated ExperimentConfig."""
    data = dict(data)
    model_table = data.pop("model", {}) or {}
    cfg = from_dict(ExperimentConfig, data)
    cfg.model = build_model_config(model_table)
    cfg.validate()
    return cfg


def load_config(recipe: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a recipe (default `tiny`), apply `--section.field VALUE` overrides, validate."""
    path = recipe_path(recipe or DEFAULT_RECIPE)
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if "name" not in data:
        data["name"] = os.path.basename(path)[:-5]
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return build_config(data)
