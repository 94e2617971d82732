"""Memory per GPU and step time of one parallel layout (the planner's model; docs/planning.md).

Measured (profile.py, on the meta device): parameters per piece of the model, and the bytes each
piece saves for the backward as a function of micro-batch rows and tokens. Modeled here:

weights      float32 parameters (the trainer keeps float32 parameters and computes under bf16
             autocast, so there is no separate master copy), of the heaviest pipeline stage,
             split by tp (every weight, the vocabulary-parallel embedding and head included) and,
             with ZeRO-3 / FSDP, by dp_shard x cp; ZeRO-3 adds the float32 unsharded parameters
             of the running block and the prefetched next one.
gradients    float32, split by tp, and by dp_shard x cp from ZeRO-2 on.
optimizer    AdamW: exp_avg and exp_avg_sq in float32 (8 bytes per parameter), split by tp, and by
             dp_shard x cp from ZeRO-1 on; plus its float32 step count per parameter tensor.
activations  what the micro-batches in flight saved for the backward, plus a working set.
             Without activation checkpointing: every piece's saved bytes, times the micro-batches in
             flight (1F1B: stage s holds min(pp - s, micro-batches) of them); working set: the
             gradients of the largest piece while its backward runs (about its saved bytes).
             The head + loss piece is the fused head loss's (training.fused_loss, models/
             common/fused_loss.py: no logits kept) where the trainer runs it, without tp and pp.
             With checkpointing: the input of every block (what `checkpoint` keeps) and the saved
             bytes of the pieces outside the blocks (embedding, head + loss), times the micro-
             batches in flight; working set: one block recomputed plus the largest piece's gradients.
             tp splits all of it (sequence parallelism splits the residual stream too); cp runs
             seq_len / cp tokens per rank.
states       context parallelism only: each rank keeps the final state and cumulative transition
             (taken as state-sized) of all cp ranks for every recurrent layer, for the backward's
             correction (ModelSpec.state_elements, float32), split by tp. Without cp a sequence's
             states live inside the activations.
reserve      a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation.
experts      tensor parallelism splits every expert's width (with or without ep). Expert parallelism
             (ep > 1, MoE models): the experts' weights, gradients and AdamW moments are split by
             dp_shard x cp (each of those ranks stores E / (dp_shard x cp) experts) and tp, outside
             FSDP2. With ep < dp_shard x cp the ranks of a group gather the E / ep experts they
             compute with before each MoE layer; the gathered weights stay saved for the backward
             (per micro-batch in flight, every MoE layer of the stage; with checkpointing only the
             recomputed block's), counted with the activations. The all-to-all volume per GPU and
             step is reported (`all_to_all`): per MoE layer each routed (token, expert) pair's
             d_model activations leave the rank (fraction (ep-1)/ep) and come back, forward and
             backward (and the recomputed forward with checkpointing); the experts' gather is not.

Step time = training FLOPs per token (ModelSpec.flops_per_token) x tokens per step, x 4/3 with
activation checkpointing (one more forward), / (GPUs x peak x MFU), x (1 + (pp - 1) / m), the 1F1B
bubble with m micro-batches per step. Communication is not modeled.
"""

from __future__ import annotations

import dataclasses

from undertow.parallel.expert_layout import expert_count_problem
from undertow.parallel.mesh import LayoutError, ParallelDims
from undertow.parallel.pipeline_split import StageCosts, balance_stages, stage_ranges
from undertow.models.profile import ModelProfile, Piece

GIB = 2**30
AC_RECOMPUTE = 4.0 / 3.0  # training FLOPs of forward + backward (3 units) plus one more forward


@dataclasses.dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1  # expert parallelism: the MoE experts split over ep of the dp_shard x cp ranks
    ac: bool = False  # activation checkpointing of every block
    zero: int = 0  # 0: replicated; 1: optimizer sharded; 2: + gradients; 3: + weights (FSDP)

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp, self.ep)

    @property
    def shard_group(self) -> int:
        """The ranks ZeRO / FSDP shard over (FSDP2's dp_shard_cp)."""
        return self.dp_shard * self.cp


@dataclasses.dataclass
class Setup:
    """What the plan is asked for."""

    gpus: int
    gpu_memory: float  # bytes
    seq_len: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int  # rows per forward/backward on one rank
    mfu: float  # fraction of peak reached on the FLOPs executed
    peak_tflops: float  # dense bf16 peak of one GPU
    reserve: float = 3 * GIB


@dataclasses.dataclass
class ModelFacts:
    profile: ModelProfile
    flops_per_token: float  # training FLOPs per token at the setup's seq_len
    stage_costs: StageCosts  # per block and the end stages' extras, for the pipeline split (as a run splits)
    state_elements: list[int]  # float32 recurrent state per block and sequence
    shape_limits: list[tuple[str, str, int]]  # (degree, what, size)
    expert_elements: list[int] = dataclasses.field(default_factory=list)  # per block: MoE expert weights ([]: none)
    n_experts: int = 0  # experts per MoE layer (0: no MoE layers)
    routed_per_token: int = 0  # sum over MoE layers of top_k x d_model: activation elements a token sends
    # what context parallelism must also divide (the family config's context_limits, e.g. Titans' whole
    # segments per cp slice), as the trainer checks it before any work
    context_limits: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Estimate:
    layout: Layout
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    states: float = 0.0
    reserve: float = 0.0
    micro_batches: int = 0  # per step and data-parallel rank
    tokens: int = 0  # per step
    step_time: float | None = None  # seconds
    all_to_all: float = 0.0  # expert parallelism: bytes each GPU sends per step (not in step_time)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.states + self.reserve

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def tokens_per_s(self) -> float:
        return 0.0 if self.step_time is None else self.tokens / self.step_time


def split_stages(costs: StageCosts, pp: int) -> list[list[int]]:
    """The blocks of each of `pp` stages: the split a run makes (parallel/pipeline_split.py's
    exact balance of the per-layer costs and the embedding/head extras), so plan and run agree."""
    return [list(r) for r in stage_ranges(balance_stages(costs.layers, pp, costs.first, costs.last))]


def stage_memory(layout: Layout, facts: ModelFacts, setup: Setup, pieces: list[Piece], blocks: list[int],
                 in_flight: int) -> dict[str, float]:
    """Bytes per GPU of one pipeline stage holding `pieces` (its blocks, indices `blocks`)."""
    profile, tp, group = facts.profile, layout.tp, layout.shard_group
    elements, tensors = profile.parameters(pieces)
    experts = [facts.expert_elements[i] if layout.ep > 1 and facts.expert_elements else 0 for i in blocks]
    split = sum(experts) / group / tp  # per-rank stored experts, outside FSDP (ep > 1)
    # ep < dp_shard x cp: the E / ep experts a rank computes with, gathered per MoE layer
    gathered = [4.0 * e / layout.ep / tp for e in experts] if layout.ep < group else [0.0]
    elements -= sum(experts)
    weights = 4.0 * elements / tp / (group if layout.zero >= 3 else 1) + 4.0 * split
    if layout.zero >= 3 and blocks:  # the gathered block: its experts stay split
        largest = max(profile.parameters([profile.blocks[i]])[0] - e for i, e in zip(blocks, experts))
        weights += 2 * 4.0 * largest / tp
    gradients = 4.0 * elements / tp / (group if layout.zero >= 2 else 1) + 4.0 * split
    optimizer = 8.0 * elements / tp / (group if layout.zero >= 1 else 1) + 8.0 * split + 4.0 * tensors

    b, t = setup.micro_batch, setup.seq_len // layout.cp
    saved = [p.saved_bytes(b, t) / tp for p in pieces]
    if layout.ac:
        outside = [v for p, v in zip(pieces, saved) if p.name in ("pre", "post")]
        kept = sum(profile.blocks[i].input_bytes(b, t) / tp for i in blocks) + sum(outside)
        recompute = max((profile.blocks[i].saved_bytes(b, t) / tp for i in blocks), default=0.0)
        working = recompute + max(saved) + max(gathered, default=0.0)
    else:
        kept, working = sum(saved) + sum(gathered), max(saved)
    states = 0.0
    if layout.cp > 1:
        states = in_flight * b * layout.cp * sum(2 * 4.0 * facts.state_elements[i] for i in blocks) / tp
    return {
        "weights": weights, "gradients": gradients, "optimizer": optimizer,
        "activations": in_flight * kept + working, "states": states,
    }


def estimate(layout: Layout, facts: ModelFacts, setup: Setup) -> Estimate:
    """Memory of the heaviest stage and step time of `layout`; `problems` says why it cannot run."""
    est = Estimate(layout=layout, reserve=setup.reserve)
    profile = facts.profile
    limits = [*facts.shape_limits, ("cp", "seq_len", setup.seq_len), ("pp", "layers", len(profile.blocks))]
    if layout.cp > 1:
        limits += facts.context_limits
    if layout.tp > 1:  # sequence parallelism splits each cp slice of a row over the tp ranks (as the trainer checks)
        limits.append(("tp", "seq_len / cp", setup.seq_len // layout.cp))
    if layout.ep > 1:
        if not facts.n_experts:
            est.problems.append(f"ep={layout.ep}: the model has no MoE layers")
            return est
        limits.append(("ep", "n_experts", facts.n_experts))
    try:
        layout.dims.validate(setup.gpus, limits)
    except LayoutError as e:
        est.problems.append(str(e))
        return est
    problem = expert_count_problem(layout, facts.n_experts)
    if problem:
        est.problems.append(f"ep={layout.ep}: valid ep {problem}")
        return est
    dims = layout.dims
    if setup.global_batch % (dims.dp * setup.micro_batch):
        est.problems.append(
            f"global batch of {setup.global_batch} sequences does not split into dp={dims.dp} x "
            f"micro-batch {setup.micro_batch}"
        )
        return est
    m = setup.global_batch // (dims.dp * setup.micro_batch)
    stages = split_stages(facts.stage_costs, layout.pp)
    worst: dict[str, float] = {}
    for s, blocks in enumerate(stages):
        pieces = [profile.blocks[i] for i in blocks]
        if s == 0:
            pieces.insert(0, profile.pieces[0])
        if s == layout.pp - 1:
            # the trainer's fused head loss runs without tp and pp (profile.fused_post, when profiled)
            pieces.append(profile.post(fused=layout.tp == 1 and layout.pp == 1))
        in_flight = min(layout.pp - s, m)
        memory = stage_memory(layout, facts, setup, pieces, blocks, in_flight)
        if sum(memory.values()) > sum(worst.values()):
            worst = memory
    for key, value in worst.items():
        setattr(est, key, value)
    est.micro_batches = m
    tokens = setup.global_batch * setup.seq_len
    flops = facts.flops_per_token * tokens * (AC_RECOMPUTE if layout.ac else 1.0)
    compute = flops / (setup.gpus * setup.peak_tflops * 1e12 * setup.mfu)
    est.step_time = compute * (1.0 + (layout.pp - 1) / m)
    est.tokens = tokens
    if layout.ep > 1:  # dispatch + combine, forward and backward (+ the recomputed forward)
        exchanges = 6 if layout.ac else 4
        per_rank = tokens / (dims.dp * layout.cp) * facts.routed_per_token * profile.compute_dtype.itemsize
        est.all_to_all = exchanges * per_rank * (layout.ep - 1) / layout.ep
    if est.total > setup.gpu_memory:
        est.problems.append(f"needs {est.total / GIB:.1f} GiB > {setup.gpu_memory / GIB:.0f} GiB")
    return est
