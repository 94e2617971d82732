"""Pipeline parallelism: the layer stack split into stages over the "pp" mesh dimension, run by a
torch.distributed.pipelining schedule.

    runner = PipelineRunner(model, spec, dims, mesh, schedule="1f1b", microbatches=4, seq_len=T)
    loss, grad_norm = runner.train_step(micro_batches, n_labels, grad_scale=1.0, grad_clip=1.0)
    optimizer.step()        # over runner.model.parameters(): this rank's stages only

`PipelineRunner` prunes the (materialized, initialized) model in place to what this rank runs:
the blocks of its stages (a `LayerSlice` that keeps their original indices, so parameter names
and checkpoints are the same under every layout), the embedding when it holds stage 0, the final
norm and LM head when it holds the last stage. Each stage is a `StageModule` that runs the
model's own forward steps (CausalLMShell: layer_context, embed_stage, run_layer, head_stage) on
its slice; the batch's side inputs (position_ids, doc_ids) go to every stage, which computes the
blocks' context (RoPE, document boundaries) itself, and stages send each other the tuple of
carried activations (one tensor or more).

Modules of the shell that every block uses (`model.shared_by_blocks`, e.g. a router recurrent across layers, whose
state the stages send on with the activations): each pp rank keeps a copy, broadcast from pp rank 0,
their gradients summed over the stages like tied embeddings; with data or context parallelism they
are replicated on FSDP2's mesh and their gradients averaged over the dp x cp ranks by hand
(pipeline_shared.py: no stage module holds them, so FSDP2 does not).

Loss: the last stage computes the token-sum cross-entropy of each micro-batch divided by the
step's global label count (times `grad_scale`, as Trainer.train_step does), so gradients equal
the single-process step's. Tied embeddings: with the embedding and the head on different ranks,
each holds a copy; they start equal (broadcast from stage 0's rank) and their gradients are summed
over a two-rank group before the optimizer step, so they stay equal.

With other parallel dimensions (FSDP2/HSDP, TP, CP): the trainer hands `stage_modules` to
parallel/apply.py, which shards them (each an FSDP root) after this pruning; see docs/parallelism.md.

Schedules (`SCHEDULES`): gpipe, 1f1b (one stage per rank); interleaved_1f1b, zero_bubble
(ScheduleInterleavedZeroBubble: the backward split into input and weight gradients),
both with `virtual_stages` stages per rank in a loop; zbv (ScheduleZBVZeroBubble: two stages per
rank in a V; validation under it goes through `_forward_chain`, since torch's V runtime runs
backward actions in eval()). Stage sizes: `parallel.pp_split` by hand, or balanced by layer cost
(pipeline_split.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, schedules
from torch.distributed.tensor import DTensor

from undertow.log import get_logger
from undertow.models.common.documents import (
    cu_seqlens_from_doc_ids,
    doc_ids_from_cu_seqlens,
)
from undertow.models.common.aux import paused
from undertow.models.common.loss import lm_loss_sum
from undertow.parallel.mesh import LayoutError, ParallelDims, process_groups
from undertow.parallel.pipeline_shared import reduce_shared_grads, shared_parameters
from undertow.parallel.pipeline_split import (
    StageCosts,
    rank_of_stage,
    resolve_split,
    stage_costs,
    stage_loads,
    stage_memory,
    stage_ranges,
    stages_of_rank,
    with_activation_memory,
)
from undertow.parallel.tensor import loss_context

log = get_logger("undertow.pipeline")

# name -> (schedule class name in torch.distributed.pipelining.schedules, stages per rank: "one"/"loop"/"v")
_SCHEDULE_CLASSES = {
    "gpipe": ("ScheduleGPipe", "one"),
    "1f1b": ("Schedule1F1B", "one"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
}
# the schedules the installed torch offers
SCHEDULES = {name: entry for name, entry in _SCHEDULE_CLASSES.items() if hasattr(schedules, entry[0])}
SIDE_INPUTS = ("position_ids", "doc_ids")  # per-token inputs every stage reads, split with the rows


class LayerSlice(nn.ModuleList):
    """Some blocks of a stack under their original indices: parameter names stay `layers.<i>.…` as in
    the full model. Iteration and len() see the kept blocks in order; `slice[i]` is block i."""

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__()
        for index in sorted(blocks):
            self.add_module(str(index), blocks[index])

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def indices(self) -> list[int]:
        return [int(k) for k in self._modules]


class StageModule(nn.Module):
    """One pipeline stage of a CausalLMShell: blocks `layer_ids`, plus the embedding (first stage)
    and the final norm + LM head (last stage). The modules are the shell's own (shared, not copied).

    forward(*carried, position_ids=None, doc_ids=None): carried is (input_ids (B, T),) on the first
    stage, else the previous stage's carried activations; returns logits (B, T, V) on the last
    stage, else the carried activations after its blocks."""

    def __init__(self, shell: nn.Module, layer_ids: range, is_first: bool, is_last: bool, seq_shards: int = 1):
        super().__init__()
        # under sequence parallelism (tp > 1) the carried activations hold T / tp positions
        self.seq_shards = seq_shards
        self.embed = shell.embed if is_first else None
        self.layers = LayerSlice({i: shell.layers[i] for i in layer_ids})
        self.norm = shell.norm if is_last else None
        self.lm_head = shell.lm_head if is_last else None
        self.is_first, self.is_last = is_first, is_last
        object.__setattr__(self, "shell", shell)  # for its forward steps; not a submodule

    def forward(self, *carried: torch.Tensor, position_ids=None, doc_ids=None):
        B, T = carried[0].shape[:2]
        if not self.is_first:
            T *= self.seq_shards
        # documents for flash-attention's varlen path; max_seqlen = T bounds every segment
        cu_seqlens = cu_seqlens_from_doc_ids(doc_ids) if doc_ids is not None else None
        ctx = self.shell.layer_context((B, T), carried[0].device, position_ids=position_ids, doc_ids=doc_ids,
                                       cu_seqlens=cu_seqlens, max_seqlen=T if doc_ids is not None else None)
        if self.is_first:
            carried = self.shell.embed_stage(carried[0], ctx)
        for layer in self.layers:
            carried = self.shell.run_layer(layer, carried, ctx)
        return self.shell.head_stage(carried) if self.is_last else carried


def _prune(shell: nn.Module, layer_ids: list[int], has_first: bool, has_last: bool) -> None:
    """Keep in `shell` only what this rank runs (in place). A head tied to the embedding keeps the
    embedding module too (the same weight: no memory), so the tied parameter is named `embed.weight`
    on every rank, as in the full model, and optimizer states and checkpoints reshard across layouts."""
    shell.layers = LayerSlice({i: shell.layers[i] for i in layer_ids})
    tied_head = has_last and shell.lm_head.weight is shell.embed.weight
    if not has_first and not tied_head:
        shell.embed = None
    if not has_last:
        shell.norm = None
        shell.lm_head = None


def _quiet_shape_inference(stage: PipelineStage) -> PipelineStage:
    """A stage whose shape inference (torch runs the stage module once on uninitialized inputs before
    the first step) records no aux metric and warns nothing: its values are not the step's (a NaN
    Newton residual, say)."""
    for name in ("_forward_metadata_inference", "_shape_inference"):  # torch 2.13 / older releases
        method = getattr(stage, name, None)
        if callable(method):
            def quiet(*args, _method=method, **kwargs):
                with paused(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return _method(*args, **kwargs)
            setattr(stage, name, quiet)
    return stage


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise). A replicated loss is its value."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def merge_micro_batches(micro_batches: list[dict]) -> dict:
    """The trainer's micro-batches as one batch of rows (the schedule splits it again): input_ids,
    labels and the side inputs, concatenated on the batch dimension. Documents given only by
    cu_seqlens (which describe one micro-batch's flattened tokens) become doc_ids first."""
    rows = []
    for batch in micro_batches:
        B, T = batch["input_ids"].shape
        row = {k: batch[k] for k in ("input_ids", "labels", *SIDE_INPUTS) if batch.get(k) is not None}
        if "doc_ids" not in row and batch.get("cu_seqlens") is not None:
            row["doc_ids"] = doc_ids_from_cu_seqlens(batch["cu_seqlens"], B, T)
        rows.append(row)
    keys = rows[0].keys()
    if any(r.keys() != keys for r in rows):
        raise ValueError("micro-batches of one step must carry the same keys")
    return {k: torch.cat([r[k] for r in rows]) for k in keys}


class PipelineRunner:
    """Prunes `model` to this rank's stages and runs training steps through a pipeline schedule.

    model:          a CausalLMShell, materialized and initialized (the same on every rank)
    schedule:       a key of SCHEDULES
    microbatches:   pipeline micro-batches per step (the step's rows are split into this many)
    virtual_stages: stages per rank (interleaved schedules; 2 for zbv)
    split:          layers per stage (pp x virtual_stages entries), or [] to balance by cost
    seq_len:        for the layer costs (attention's grows with it)
    autocast:       a context manager factory the forward runs under (the trainer's)
    costs:          the layers' StageCosts (default: stage_costs(spec, model.cfg, seq_len))
    activation_budget: bytes of saved activations a stage may hold at its peak (automatic split;
                    costs must carry memory, see pipeline_split.with_activation_memory); 0: no limit
    """

    def __init__(
        self,
        model: nn.Module,
        spec,
        dims: ParallelDims,
        mesh: DeviceMesh,
        *,
        schedule: str = "1f1b",
        microbatches: int = 1,
        virtual_stages: int = 1,
        split: list[int] | None = None,
        seq_len: int = 2048,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        costs: StageCosts | None = None,
        activation_budget: float = 0.0,
    ):
        if schedule not in SCHEDULES:
            missing = "" if schedule not in _SCHEDULE_CLASSES else " (not in the installed torch)"
            raise LayoutError(f"parallel.pp_schedule = {schedule!r} is unknown{missing}; valid: {sorted(SCHEDULES)}")
        class_name, style = SCHEDULES[schedule]
        if style == "one" and virtual_stages != 1:
            raise LayoutError(f"parallel.pp_virtual_stages = {virtual_stages}: {schedule} runs one stage per rank; "
                              "use interleaved_1f1b, zero_bubble or zbv for more")
        if microbatches < 1:
            raise LayoutError(f"parallel.pp_microbatches = {microbatches}: must be >= 1")
        self.pp, self.virtual, self.style, self.tp = dims.pp, virtual_stages, style, dims.tp
        self.n_stages = dims.pp * virtual_stages
        self.microbatches = microbatches
        self.autocast = autocast
        self.group = mesh["pp"].get_group()
        self.data_ranks = dims.dp * dims.cp  # the ranks of other tokens (shared_by_blocks' gradients: their mean)
        self.data_group = mesh["dp_cp"].get_group() if self.data_ranks > 1 else None
        self.pp_rank = mesh["pp"].get_local_rank()
        self.device = next(model.parameters()).device
        self.tied = bool(getattr(model.cfg, "tie_embeddings", False))

        if self.tied and style == "v" and dims.dp_replicate * dims.dp_shard * dims.cp > 1:
            raise LayoutError(f"{schedule} puts the first and the last stage on one rank, and with tied embeddings "
                              "FSDP would shard the shared weight in both; untie them (model.tie_embeddings = false) "
                              "or use 1f1b, gpipe, interleaved_1f1b or zero_bubble")
        costs = costs or stage_costs(spec, model.cfg, seq_len)
        self.counts = resolve_split(split or [], costs, self.n_stages, activation_budget, microbatches, schedule)
        ranges = stage_ranges(self.counts)
        self.stage_ids = stages_of_rank(self.pp_rank, self.pp, virtual_stages, style)
        last = self.n_stages - 1
        self.has_first, self.has_last = 0 in self.stage_ids, last in self.stage_ids
        self.tied_group = self._tied_group(mesh, rank_of_stage(0, self.pp, style), rank_of_stage(last, self.pp, style))
        if self.tied_group is not None:  # the two copies start equal
            weight = model.embed.weight if self.has_first else model.lm_head.weight
            with torch.no_grad():
                dist.broadcast(weight, group=self.tied_group, group_src=0)

        _prune(model, [i for s in self.stage_ids for i in ranges[s]], self.has_first, self.has_last)
        self.model = model
        self._copy_shared_by_blocks()
        # the modules the schedule runs, one per stage of this rank: parallel/apply.py hooks them (TP)
        # and makes each one an FSDP root
        self.stage_modules = [StageModule(model, ranges[s], s == 0, s == last, seq_shards=dims.tp)
                              for s in self.stage_ids]
        # A PipelineStage keeps its module by reference and checks at run time whether it is an FSDP
        # module, so FSDP2 applied to the stage modules after this still gets its gradient reduction
        # held back to the step's last micro-batch.
        stages = [_quiet_shape_inference(PipelineStage(m, s, self.n_stages, self.device, group=self.group))
                  for m, s in zip(self.stage_modules, self.stage_ids)]
        cls = getattr(schedules, class_name)
        self.schedule = cls(stages[0] if style == "one" else stages, n_microbatches=microbatches,
                            loss_fn=self._loss, scale_grads=False)
        self._loss_scale = 1.0
        if self.pp_rank == 0:
            loads = stage_loads(costs, self.counts)
            log.info("pipeline %s: %d stages of %s layers (relative cost %s), %d micro-batches per step", schedule,
                     self.n_stages, self.counts, [round(c / max(loads), 3) for c in loads], microbatches)
            if costs.memory is not None:
                peaks = stage_memory(costs, self.counts, microbatches, schedule)
                log.info("pipeline: saved activations per stage at its peak (estimate) %s GiB",
                         [round(m / 2**30, 3) for m in peaks])

    @classmethod
    def from_config(cls, model, spec, dims, mesh, cfg, autocast=contextlib.nullcontext,
                    compute_dtype: torch.dtype = torch.float32) -> PipelineRunner:
        """From an ExperimentConfig: parallel.pp_* and data.seq_len; pp_microbatches = 0 means one
        per loader micro-batch (training.grad_accum_steps). With parallel.pp_activation_gib the
        layers' activation memory is measured for the run's micro-batch (rows, tokens per cp rank,
        compute dtype, activation checkpointing)."""
        p, t = cfg.parallel, cfg.training
        microbatches = p.pp_microbatches or t.grad_accum_steps
        costs = stage_costs(spec, model.cfg, cfg.data.seq_len)
        if p.pp_activation_gib > 0 and not p.pp_split:
            rows = -(-t.micro_batch_size * t.grad_accum_steps // microbatches)
            costs = with_activation_memory(costs, spec, model.cfg, rows, cfg.data.seq_len // dims.cp, compute_dtype,
                                           checkpointed=t.activation_checkpointing, shards=dims.tp)
        return cls(model, spec, dims, mesh, schedule=p.pp_schedule, microbatches=microbatches,
                   virtual_stages=p.pp_virtual_stages, split=list(p.pp_split), seq_len=cfg.data.seq_len,
                   autocast=autocast, costs=costs, activation_budget=p.pp_activation_gib * 2**30)

    def _tied_group(self, mesh: DeviceMesh, first_rank: int, last_rank: int):
        """The two-rank group (per position in the other mesh dimensions) of the embedding's and
        the head's copies of a tied weight; None when they are one parameter on one rank."""
        if not self.tied or first_rank == last_rank:
            return None
        grid = mesh.mesh  # global ranks, (pp, dp_replicate, dp_shard, cp, tp)
        mine = None
        cache = process_groups()
        for a, b in zip(grid[first_rank].flatten().tolist(), grid[last_rank].flatten().tolist()):
            if ("pair", a, b) not in cache:  # collective: every rank creates every pair, in order
                cache["pair", a, b] = dist.new_group([a, b])
            group = cache["pair", a, b]
            if dist.get_rank() in (a, b):
                mine = group
        return mine

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(logits, labels) * self._loss_scale

    def _run(self, batch: dict, losses: list, forward_only: bool) -> None:
        rows = batch["input_ids"].shape[0]
        if rows < self.microbatches:
            raise ValueError(f"a step of {rows} rows cannot fill parallel.pp_microbatches = {self.microbatches}; "
                             "raise training.micro_batch_size or training.grad_accum_steps, or lower pp_microbatches")
        kwargs = {k: batch[k].to(self.device) for k in SIDE_INPUTS if k in batch}
        run = self.schedule.eval if forward_only else self.schedule.step
        with self.autocast(), loss_context(self.tp):  # vocab-parallel cross-entropy under tensor parallelism
            run(batch["input_ids"].to(self.device), target=batch["labels"].to(self.device), losses=losses, **kwargs)

    def _from_last_stage(self, losses: list) -> torch.Tensor:
        """The summed losses of the last stage, on every pp rank."""
        total = torch.stack([_local(x).detach().float() for x in losses]).sum() if self.has_last else \
            torch.zeros((), device=self.device)
        dist.all_reduce(total, group=self.group)
        return total

    def train_step(self, micro_batches: list[dict], n_labels: int, grad_scale: float = 1.0,
                   grad_clip: float = 0.0) -> tuple[torch.Tensor, float]:
        """Forward and backward of the step's micro-batches (this data-parallel rank's), gradients of
        tied copies summed, clipped to `grad_clip` (0: not clipped). Returns (this rank's rows' loss
        sum / n_labels, on every pp rank; the global gradient norm)."""
        self._loss_scale = grad_scale / max(n_labels, 1)
        losses: list[torch.Tensor] = []
        self._run(merge_micro_batches(micro_batches), losses, forward_only=False)
        self.sync_tied_grads()
        loss = self._from_last_stage(losses) / grad_scale
        return loss, self.clip_grad_norm_(grad_clip)

    @torch.no_grad()
    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Forward only: the summed cross-entropy of `batch`, on every pp rank (for validation)."""
        self._loss_scale = 1.0
        losses: list[torch.Tensor] = []
        if self.style == "v":  # torch 2.13 runs backward actions in a V schedule's eval(): a chain of our own
            with self.autocast(), loss_context(self.tp):
                self._forward_chain(merge_micro_batches([batch]), losses)
        else:
            self._run(merge_micro_batches([batch]), losses, forward_only=True)
        return self._from_last_stage(losses)

    def _forward_chain(self, batch: dict, losses: list) -> None:
        """The whole batch through the stages in order, forward only: each rank runs its stages as
        they come; a stage's carried activations go to the next stage's rank by send/recv (tensor
        count, shapes and dtypes first) or stay here when this rank holds it too. Every rank walks
        the stages in the same order, so each send meets its receive."""
        kwargs = {k: batch[k].to(self.device) for k in SIDE_INPUTS if k in batch}
        carried: tuple = (batch["input_ids"].to(self.device),)
        modules = dict(zip(self.stage_ids, self.stage_modules))

        def peer(stage: int) -> int:
            return dist.get_global_rank(self.group, rank_of_stage(stage, self.pp, self.style))

        for stage in range(self.n_stages):
            if stage not in modules:
                continue
            if stage > 0 and stage - 1 not in modules:
                meta = [None]
                dist.recv_object_list(meta, src=peer(stage - 1), group=self.group)
                carried = tuple(torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in meta[0])
                for tensor in carried:
                    dist.recv(tensor, src=peer(stage - 1), group=self.group)
            out = modules[stage](*carried, **kwargs)
            if stage == self.n_stages - 1:
                losses.append(self._loss(out, batch["labels"].to(self.device)))
                return
            carried = out if isinstance(out, tuple) else (out,)
            if stage + 1 not in modules:
                meta = [[(tuple(t.shape), t.dtype) for t in carried]]
                dist.send_object_list(meta, dst=peer(stage + 1), group=self.group)
                for tensor in carried:
                    dist.send(tensor.contiguous(), dst=peer(stage + 1), group=self.group)

    def _copy_shared_by_blocks(self) -> None:
        """Modules the shell names in `shared_by_blocks` are used by the blocks of every stage (e.g. a router
        recurrent across layers): every pp rank keeps a copy, equal from the start (broadcast from pp rank 0) and
        kept equal by summing their gradients over the pp group (and averaging them over the dp x cp ranks)
        each step (sync_tied_grads, pipeline_shared.py)."""
        with torch.no_grad():
            for p in self.shared:
                dist.broadcast(_local(p), group=self.group, group_src=0)

    @property
    def shared(self) -> list[nn.Parameter]:
        """The parameters shared by blocks of every stage, looked up each time (tensor parallelism replaces them)."""
        return shared_parameters(self.model)

    def sync_tied_grads(self) -> None:
        # summed over the stages that used them (zeros where none did), averaged over the dp x cp ranks
        reduce_shared_grads(self.shared, self.group, self.data_group, self.data_ranks)
        if self.tied_group is None:
            return
        weight = self.model.embed.weight if self.has_first else self.model.lm_head.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        # under FSDP/TP both copies are sharded alike (the same coordinates in the other mesh
        # dimensions), so the local shards are summed
        dist.all_reduce(_local(weight.grad), group=self.tied_group)

    def _norm_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, a tied copy counted on stage 0's rank only."""
        skip = {id(self.model.lm_head.weight)} if self.tied_group is not None and not self.has_first else set()
        if self.pp_rank != 0:  # copies of modules shared by the blocks: counted on pp rank 0
            skip |= {id(p) for p in self.shared}
        return [p for p in self.model.parameters() if id(p) not in skip]

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The 2-norm of every gradient of the model (all stages); scales them to `max_norm` if above (> 0)."""
        grads = [p.grad for p in self._norm_parameters() if p.grad is not None]
        local = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=self.device)
        if hasattr(local, "full_tensor"):
            local = local.full_tensor()
        square = local.double() ** 2
        dist.all_reduce(square, group=self.group)
        total = square.sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                 max_norm, total.float())
        return float(total)
