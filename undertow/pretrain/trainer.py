"""The training loop: data -> model -> loss -> AdamW step, with validation, checkpoints and metrics.

Read top to bottom: `Trainer.__init__` builds everything (data, model on the meta device,
optimizer, resume), `Trainer.fit` runs the steps; saving, resuming and the weights' guard are
trainer_state.py's (a mixin). Family-specific code lives in models/;
this file only talks to the registry's ModelSpec.
"""

from __future__ import annotations

import json
import math
import os
import sys
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from undertow.log import get_logger
from undertow.models import registry
from undertow.models.common.aux import collect_aux
from undertow.models.common.lm import CausalLMShell
from undertow.models.common.loss import IGNORE_INDEX, lm_loss_sum
from undertow.models.moe.load_table import write_expert_load
from undertow.parallel.apply import parallelize
from undertow.parallel.context import shard_batch
from undertow.parallel.deepspeed import build_deepspeed
from undertow.parallel.tensor import loss_context
from undertow.parallel.mesh import NAMES, ParallelDims, init_process_group_from_env
from undertow.parallel.pipeline import PipelineRunner
from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain import preflight
from undertow.pretrain.config import ExperimentConfig
from undertow.pretrain.loader import PackedLoader, resolve_sources
from undertow.pretrain.nan_guard import GoodCheckpoints, parameters_norm
from undertow.pretrain.metrics import MetricsWriter, StepClock, Throughput, detect_peak_tflops, peak_memory_gib
from undertow.pretrain.optim import build_optimizer
from undertow.pretrain.run_lock import exit_with_agent, lock_run_dir
from undertow.pretrain.schedule import lr_multiplier
from undertow.pretrain.signals import RunGuard, apply_collective_timeout
from undertow.pretrain.trainer_state import RunState, TrainingDiverged

__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "autocast_dtype", "pick_device", "train"]
log = get_logger("undertow.trainer")
MODEL_INPUTS = ("position_ids", "doc_ids", "cu_seqlens", "max_seqlen")


@dataclass
class TrainResult:
    steps: int
    last_loss: float
    last_val_loss: float | None
    skipped_steps: int
    run_dir: str
    checkpoint: str | None
    already_finished: bool = False  # resumed at training.steps: nothing was run


def pick_device(name: str) -> torch.device:
    """The training device; under torchrun with CUDA, this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"training.device = {name!r} but CUDA is not available")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """None means no autocast (float32)."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Trainer(RunState):
    def __init__(self, cfg: ExperimentConfig):
        exit_with_agent()  # under torchrun: SIGTERM (checkpoint, exit 75) when the agent dies
        self.cfg = cfg
        self.spec = registry.get(cfg.family)
        # The layout is checked against the world size and the model's shapes before any work.
        self.dims = ParallelDims(**{name: getattr(cfg.parallel, name) for name in NAMES})
        self.dims.validate(int(os.environ.get("WORLD_SIZE", "1")), cfg.layout_limits())
        self.rank, self.world_size = init_process_group_from_env()
        self.device = pick_device(cfg.training.device)
        self.mesh = self.dims.build_mesh(self.device.type) if self.world_size > 1 else None
        apply_collective_timeout(cfg.training.collective_timeout_s, self.mesh)
        self.dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        # Each rank's loss is scaled by the number of ranks FSDP averages gradients over, so the
        # average is the gradient of the global token-mean loss.
        self.grad_scale = self.dims.dp * self.dims.cp
        self.amp_dtype = autocast_dtype(cfg.training.dtype, self.device)
        if cfg.training.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.training.seed)
        ckpt_field = "checkpoint.dir" if cfg.checkpoint.dir else "training.run_dir (its checkpoints/)"
        # one writer per run directory: rank 0 holds run_dir/.lock until fit() ends (every exit path)
        self.run_lock = lock_run_dir(cfg.run_dir, self.rank == 0)
        preflight.check_writable(cfg.run_dir, cfg.checkpoint_dir, ckpt_field)  # before data and model
        if self.run_lock is not None:
            weakref.finalize(self, self.run_lock.release)  # a Trainer never fitted, or the process ending
        try:
            self._build(cfg, ckpt_field)
        except BaseException:
            if self.run_lock is not None:
                self.run_lock.release()
            raise

    def _build(self, cfg: ExperimentConfig, ckpt_field: str) -> None:
        """The rest of __init__, under the run directory's lock."""
        init_meta = self._adopt_init_model() if cfg.checkpoint.init_from else None
        if self.rank != 0:
            self._barrier()  # rank 0 prepares the embedded corpus (if used) first
        self.sources = resolve_sources(cfg.data)
        if self.rank == 0:
            self._barrier()
        self.train_loader = self._loader("train")
        self.vocab = self.train_loader.vocab_info()
        if init_meta is not None:  # before any model is built: a checkpoint of another tokenizer is refused
            self._check_same_tokenizer(cfg.checkpoint.init_from, init_meta)
        self._set_vocab(self.vocab)

        with torch.device("meta"):
            model = self.spec.model_cls(cfg.model)
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        self.checkpoint_bytes = preflight.checkpoint_bytes(sum(v.numel() for v in model.state_dict().values()))
        preflight.check_space(cfg.checkpoint_dir, ckpt_field, self.checkpoint_bytes, cfg.checkpoint.keep_last)
        model.to_empty(device=self.device)
        model.init_weights()  # the same weights on every rank (same seed), whatever the layout
        # pipeline parallel: the model keeps this rank's stages; a schedule runs forward and backward
        self.pipeline = PipelineRunner.from_config(model, self.spec, self.dims, self.mesh, cfg, self._autocast,
                                                   self.amp_dtype or torch.float32) if self.dims.pp > 1 else None
        self.model = parallelize(
            model, self.spec, self.dims, self.mesh,
            activation_checkpointing=cfg.training.activation_checkpointing, compile=cfg.training.compile,
            param_dtype=self.amp_dtype, engine=cfg.parallel.engine,
            roots=self.pipeline.stage_modules if self.pipeline is not None else None,
        )
        # the fused head loss where the model offers it (CausalLMShell's forward with labels) and the
        # head is whole here (tensor parallelism splits the vocabulary: the vocab-parallel loss instead)
        self.fused_loss = (cfg.training.fused_loss and self.pipeline is None and self.dims.tp == 1
                           and isinstance(model, CausalLMShell))
        # modules that follow the training step (e.g. a depth drawn per step, the same on every rank)
        self._step_followers = [m for m in model.modules() if callable(getattr(m, "set_training_step", None))]
        self.optimizer = build_optimizer(model, cfg.optimizer, self.device)
        self.deepspeed = cfg.parallel.engine == "deepspeed"
        if self.deepspeed:  # ZeRO instead of FSDP2: the engine and an adapter in the optimizer's place
            self.model, self.optimizer = build_deepspeed(model, self.optimizer, cfg, self.device)

        self.step = 0
        self.skipped_total = 0
        self.consecutive_bad = 0
        self.last_val_loss: float | None = None
        self.resumed_from = self._maybe_resume()
        self.good_ckpts = GoodCheckpoints(self.cfg.checkpoint_dir, cfg.checkpoint.keep_last, self.rank == 0,
                                          self.resumed_from)
        if self.resumed_from is None and init_meta is not None:
            ckpt.load_verified(cfg.checkpoint.init_from, self.model, None, cfg.checkpoint.verify)
            log.info("initialized from %s (model weights only; fresh optimizer, step 0)", cfg.checkpoint.init_from)

    # ----------------------------------------------------------------- setup
    def _loader(self, split: str) -> PackedLoader:
        d, t = self.cfg.data, self.cfg.training
        return PackedLoader(
            self.sources,
            seq_len=d.seq_len,
            batch_size=t.micro_batch_size,
            weights=d.weights or None,
            rank=self.dp_rank,
            world_size=self.dims.dp,
            num_workers=d.num_workers if split == "train" else 0,
            seed=d.seed,
            split=split,
            val_fraction=d.val_fraction,
            loop=split == "train",
            interleave=d.interleave,
        )

    def _set_vocab(self, vocab: dict | None) -> None:
        model_cfg = self.cfg.model
        data_vocab = vocab["vocab_size"] if vocab else None
        if model_cfg.vocab_size == 0:
            if data_vocab is None:
                raise ValueError("model.vocab_size = 0 needs a tokenizer in the data's manifest; set model.vocab_size")
            model_cfg.vocab_size = data_vocab
        elif data_vocab is not None and model_cfg.vocab_size < data_vocab:
            raise ValueError(
                f"model.vocab_size = {model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({data_vocab}); use >= {data_vocab} or 0 (take it from the tokenizer)"
            )
        self.vocab = vocab

    # ----------------------------------------------------------------- collectives
    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that see different tokens (data and context parallel)."""
        if self.world_size > 1:
            dist.all_reduce(value, group=self.mesh["dp_cp"].get_group())
        return value

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: dict) -> dict:
        """The batch on the device; under context parallelism, this cp rank's slice of every row."""
        if self.dims.cp > 1:
            batch = shard_batch(batch, self.mesh["cp"].get_local_rank(), self.dims.cp)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        if self.pipeline is not None:
            return self.pipeline.loss_sum(batch)
        side = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if self.fused_loss:  # the model's head computes the loss without the logits (models/common/fused_loss.py)
            with self._autocast():
                return self.model(batch["input_ids"], labels=batch["labels"], **side)
        with self._autocast():
            logits = self.model(batch["input_ids"], **side)
        return lm_loss_sum(logits, batch["labels"])

    def train_step(self, micro_batches: list[dict]) -> tuple[float, float, int]:
        """One optimizer step over `grad_accum_steps` micro-batches. Returns (loss, grad_norm, counted labels).

        The loss is the mean over every counted label of the step (token-weighted across micro-batches).
        Auxiliary losses the modules add (models/common/aux.py) join the backward once per step,
        averaged over its forwards; the metrics they record are left in `self.aux_metrics`
        (this rank's means; `gathered_aux_metrics()` averages them over the ranks).
        """
        for module in self._step_followers:
            module.set_training_step(self.step)
        forwards = self.pipeline.microbatches if self.pipeline is not None else len(micro_batches)
        with collect_aux(loss_scale=1.0 / forwards) as aux:
            result = self._train_step(micro_batches)
        self.aux_metrics = aux.means()
        return result

    def _train_step(self, micro_batches: list[dict]) -> tuple[float, float, int]:
        micro_batches = [self._to_device(b) for b in micro_batches]
        local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        n_labels = int(self._dp_sum(torch.tensor(local, dtype=torch.int64, device=self.device)))
        if self.pipeline is not None:  # forward, backward, tied copies summed, clipped over all stages
            total, grad_norm = self.pipeline.train_step(micro_batches, n_labels, self.grad_scale,
                                                        self.cfg.training.grad_clip)
            return float(self._dp_sum(total)), grad_norm, n_labels
        total = torch.zeros((), device=self.device)
        with loss_context(self.dims.tp):  # vocab-parallel cross-entropy under tensor parallelism
            for batch in micro_batches:
                loss = self._loss_sum(batch) / max(n_labels, 1)
                scaled = loss * self.grad_scale if self.grad_scale != 1 else loss
                if self.deepspeed:
                    self.optimizer.backward(scaled)  # the engine reduces at the step's last micro-batch
                else:
                    scaled.backward()
                total += loss.detach()
        if self.deepspeed:  # DeepSpeed measures, clips and steps (skipping non-finite steps) in one call
            return float(self._dp_sum(total)), float(self.optimizer.clip_and_step()), n_labels
        clip = self.cfg.training.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP/TP
            grad_norm = grad_norm.full_tensor()
        return float(self._dp_sum(total)), float(grad_norm), n_labels

    def gathered_aux_metrics(self) -> dict[str, float]:
        """The last step's aux metrics, each averaged over the ranks that recorded it (a collective:
        every rank calls it; under pipeline parallelism each stage records its own layers')."""
        mine = getattr(self, "aux_metrics", {})
        if self.world_size == 1:
            return dict(mine)
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        sums: dict[str, list[float]] = {}
        for metrics in everyone:
            for name, value in metrics.items():
                sums.setdefault(name, []).append(value)
        return {name: sum(values) / len(values) for name, values in sorted(sums.items())}

    def _val_batches(self):
        """This data-parallel rank's first training.val_batches batches of the held-out split."""
        for i, batch in enumerate(self._loader("val")):
            if i >= self.cfg.training.val_batches:
                return
            yield batch

    @torch.no_grad()
    def validate(self, batches: list[dict] | None = None) -> float | None:
        """The mean loss over every counted label of the validation batches of all data- and
        context-parallel ranks (None when they hold no label). `batches`: this data-parallel rank's
        (default: its first training.val_batches of the held-out split)."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, counted labels
        for batch in self._val_batches() if batches is None else batches:
            batch = self._to_device(batch)
            # under pp the runner opens its own loss_context inside this one (they nest)
            with loss_context(self.dims.tp):
                sums[0] += self._loss_sum(batch).double()
            sums[1] += (batch["labels"] != IGNORE_INDEX).sum()
        self.model.train()
        loss_sum, n_labels = self._dp_sum(sums).tolist()
        return loss_sum / n_labels if n_labels else None

    def _step_flops(self) -> float | None:
        """Training FLOPs per token of the step just run (self.step, before it counts), where the family's
        cost changes per step (ModelSpec.step_flops_per_token); None: the nominal count."""
        per_step = self.spec.step_flops_per_token
        return per_step(self.cfg.model, self.cfg.data.seq_len, self.step) if per_step else None

    def fit(self) -> TrainResult:
        with self.run_lock if self.run_lock is not None else nullcontext():  # released however fit ends
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.training
        lead = self.rank == 0
        if self.resumed_from is not None and self.step >= t.steps:
            val = f" (validation loss {self.last_val_loss:.4f})" if self.last_val_loss is not None else ""
            log.info("%s already finished at step %d%s; nothing to do (raise training.steps to train on)",
                     cfg.run_dir, self.step, val)
            return TrainResult(self.step, float("nan"), self.last_val_loss, self.skipped_total, cfg.run_dir,
                               self.resumed_from, already_finished=True)
        if lead:
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
        writer = MetricsWriter(cfg.run_dir, cfg.logging.tensorboard, enabled=lead, start_step=self.step)
        peak = t.peak_tflops or detect_peak_tflops(self.device)
        # tokens/s of the whole job (every data-parallel rank), MFU against every device's peak
        meter = Throughput(self.spec.flops_per_token(cfg.model, cfg.data.seq_len), peak * self.world_size)
        log.info(
            "model %s: %.2fM parameters, %.3g FLOPs/token; layout %s (%d processes); device %s, autocast %s; "
            "steps %d..%d", cfg.family, self.n_params / 1e6, meter.flops_per_token, self.dims.describe(),
            self.world_size, self.device, self.amp_dtype, self.step, t.steps,
        )
        data = iter(self.train_loader)
        param_norm = None if self.deepspeed else parameters_norm(self.model.parameters(), self.world_size > 1)
        last_loss, last_ckpt = float("nan"), self.resumed_from
        clock = StepClock(self.step, t.steps)
        bar = tqdm(total=t.steps, initial=self.step, unit="step", disable=not (lead and sys.stderr.isatty()),
                   dynamic_ncols=True)
        try:
            with logging_redirect_tqdm(), RunGuard(t, self.device) as guard:  # stop signals, hang watchdog
                while self.step < t.steps:
                    guard.beat("train step", self.step + 1)
                    micro = [next(data) for _ in range(t.grad_accum_steps)]
                    lr = cfg.optimizer.lr * lr_multiplier(self.step, t.steps, cfg.schedule)
                    for group in self.optimizer.param_groups:  # before train_step: DeepSpeed steps in it
                        group["lr"] = lr
                    loss, grad_norm, _ = self.train_step(micro)
                    meter.add(sum(b["input_ids"].numel() for b in micro) * self.dims.dp, self._step_flops())
                    finite = math.isfinite(loss) and math.isfinite(grad_norm)
                    if finite:
                        self.good_ckpts.confirm()  # the weights this loss came from are good
                        self.optimizer.step()
                        self.consecutive_bad = 0
                        last_loss = loss
                    else:
                        self.skipped_total += 1
                        self.consecutive_bad += 1
                        log.warning(
                            "step %d: non-finite loss %s / grad norm %s; step skipped (%d in a row, %d in all)",
                            self.step + 1, loss, grad_norm, self.consecutive_bad, self.skipped_total,
                        )
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    bar.update(1)
                    writer.record(self.step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": not finite})
                    if finite and not self.deepspeed:  # DeepSpeed skips non-finite steps itself
                        param_norm = self._check_step_kept_weights(param_norm, lr, grad_norm)
                    if self.consecutive_bad >= t.max_bad_steps:
                        raise self._diverged(f"{self.consecutive_bad} consecutive non-finite steps (training."
                                             f"max_bad_steps = {t.max_bad_steps}) up to step {self.step}")
                    if self.step % cfg.logging.every == 0 or self.step == t.steps:
                        tps, mfu = meter.read()
                        aux = self.gathered_aux_metrics()  # collective: every rank, at the same steps
                        if aux:
                            writer.record(self.step, aux, kind="aux")
                        writer.publish(self.step, {
                            "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "mfu": mfu,
                            "peak_mem_gib": peak_memory_gib(self.device), "skipped_steps": self.skipped_total,
                            **aux,
                        }, "train", progress=clock.describe(self.step))
                    if t.val_every and cfg.data.val_fraction > 0 and (self.step % t.val_every == 0 or self.step == t.steps):
                        guard.beat("validation", self.step)
                        self.last_val_loss = self.validate()
                        if self.last_val_loss is not None:
                            val = {"loss": self.last_val_loss, "perplexity": math.exp(min(self.last_val_loss, 50.0))}
                            writer.record(self.step, val, kind="val")
                            writer.publish(self.step, val, "val")
                    every = cfg.checkpoint.every
                    saved = bool(every and self.step % every == 0) or self.step == t.steps
                    if saved and self.consecutive_bad and self.step < t.steps:
                        saved = False  # the weights may be poisoned: keep the last good checkpoint newest
                        log.warning("step %d: checkpoint not saved during %d non-finite steps in a row",
                                    self.step, self.consecutive_bad)
                    if saved:
                        guard.beat("checkpoint save", self.step)
                        last_ckpt = self.save()
                    if self.step < t.steps and guard.stop_requested():  # SIGTERM/SIGUSR1: checkpoint, then stop
                        guard.beat("checkpoint save", self.step)
                        raise guard.preempted(self.step, last_ckpt if saved else self.save())
                write_expert_load(self.model, cfg.run_dir, lead)  # MoE layers' load per expert (collective)
        finally:
            bar.close()
            writer.close()
        return TrainResult(self.step, last_loss, self.last_val_loss, self.skipped_total, cfg.run_dir, last_ckpt)


def train(cfg: ExperimentConfig) -> TrainResult:
    return Trainer(cfg).fit()
