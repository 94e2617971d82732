"""Tensor + sequence parallelism against the single-process model, on gloo CPU process groups.

For every family (transformer, Mamba-1, Mamba-2, a hybrid with `*` attention and `-` MLP layers, and
that hybrid as NVIDIA's Mamba-2-Hybrid has it: GELU MLP, attention without positional encoding),
at tp=2 and tp=4 with sequence parallelism (and the hybrid at tp=2 without): the loss and every
parameter gradient after one step, with document boundaries inside the rows, equal the
single-process run's; also with FSDP2 applied after TP (dp_shard=2 x tp=2). Every case runs in
one spawn of 4 processes (a module fixture): tp=4 over all of them, tp=2 in each half of a 2 x 2
mesh.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

from tests.distributed.harness import run_distributed
from undertow.models import registry
from undertow.models.common.loss import IGNORE_INDEX, lm_loss_sum
from undertow.models.mamba.config import MambaConfig
from undertow.models.transformer.config import TransformerConfig
from undertow.parallel.data import apply_fsdp, fsdp_mesh
from undertow.parallel.mesh import LayoutError, ParallelDims
from undertow.parallel.tensor import (
    apply_tensor_parallel,
    loss_context,
    tp_shape_limits,
)

V, B, T = 61, 2, 16  # an odd vocabulary: uneven vocab shards
FAMILIES = ("transformer", "mamba1", "mamba2", "hybrid", "hybrid-gelu-nopos")
TOLERANCE = 1e-5  # ||tp - ref|| / ||ref|| in float32 (measured: <= 5e-6, Mamba-1 at tp=4)


def config(family: str, tp: int):
    """Tiny models every tp in (2, 4) divides; grouped-query attention (2 key/value heads) at tp=2."""
    kv = 2 if tp == 2 else 4
    if family == "transformer":
        return TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv, ffn_hidden=32,
                                 init_std=0.1)
    mamba = dict(vocab_size=V, d_model=16, d_state=4, expand=2, headdim=4, ngroups=4, chunk_size=8, init_std=0.1)
    if family == "mamba1":  # Falcon-Mamba's norms on the all-reduced dt, B, C; untied head
        return MambaConfig(**mamba, layer_pattern="mm", falcon_norm=True, proj_bias=True, tie_embeddings=False)
    if family == "mamba2":  # 8 heads in 4 groups: 2 groups (gated-norm groups) per rank at tp=2
        return MambaConfig(**mamba, layer_pattern="MM", proj_bias=True)
    hybrid = dict(layer_pattern="M*-m", n_heads=4, n_kv_heads=kv)
    if family == "hybrid-gelu-nopos":  # fc1/fc2 of the default 4 * d_model = 64 hidden units
        return MambaConfig(**mamba, **hybrid, mlp="gelu", position_embedding="none")
    return MambaConfig(**mamba, **hybrid, ffn_hidden=32)


def batch(seq_len: int = T) -> dict:
    """Rows of three and two documents (positions restart, recurrences reset), some labels ignored."""
    g = torch.Generator().manual_seed(1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * (seq_len - 12), [0] * 9 + [1] * (seq_len - 9)])
    starts = torch.cat([torch.ones(B, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    index = torch.arange(seq_len).expand(B, seq_len)
    position_ids = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    labels = torch.randint(0, V, (B, seq_len), generator=g)
    labels[0, 4] = labels[1, -1] = IGNORE_INDEX
    input_ids = torch.randint(0, V, (B, seq_len), generator=g)
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids, "position_ids": position_ids}


def build(cfg, seed: int = 0):
    with torch.device("meta"):
        model = registry.build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def step(model, data: dict, tp: int) -> torch.Tensor:
    """Mean next-token loss of one forward + backward."""
    with loss_context(tp):
        logits = model(data["input_ids"], position_ids=data["position_ids"], doc_ids=data["doc_ids"])
        loss = lm_loss_sum(logits, data["labels"]) / (data["labels"] != IGNORE_INDEX).sum()
        loss.backward()
    return loss.detach()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def compare(model, ref, loss, ref_loss) -> dict:
    """Per-parameter relative gradient errors and layout facts (collective: every rank calls it)."""
    params = dict(model.named_parameters())
    ref_params = dict(ref.named_parameters())
    errors = {}
    for name, p in params.items():
        g, r = full(p.grad), ref_params[name].grad
        errors[name] = ((g - r).norm() / r.norm()).item()
    return {
        "loss": (loss.item(), ref_loss.item()),
        "grad_err": errors,
        "same_names": sorted(params) == sorted(ref_params),
        "plain": [n for n, p in params.items() if not isinstance(p, DTensor)],
        "misplaced": [n for n, p in params.items() if isinstance(p, DTensor) and p.grad.placements != p.placements],
        "sharded": [n for n, p in params.items() if isinstance(p, DTensor) and p.to_local().shape != p.shape],
    }


def against_single_process(family: str, tp_mesh, sequence_parallel: bool) -> dict:
    tp = tp_mesh.size()
    cfg = config(family, tp)
    ref = build(cfg)
    model = copy.deepcopy(ref)
    data = batch()
    ref_loss = step(ref, data, 1)
    apply_tensor_parallel(model, tp_mesh, registry.get(registry.family_of(cfg)), sequence_parallel)
    return compare(model, ref, step(model, data, tp), ref_loss)


def meta_init_then_step(tp_mesh) -> dict:
    """Built on meta, parallelized, materialized: init_weights runs on the DTensors and keeps the
    embeddings tied; with a single-process model's weights copied in, the step is that model's.
    (The values init_weights draws are not compared: on CPU, DTensor's random ops do not keep
    replicated parameters equal across ranks; its CUDA RNG tracker does.)"""
    cfg = config("hybrid", tp_mesh.size())
    with torch.device("meta"):
        model = registry.build_model(cfg)
    apply_tensor_parallel(model, tp_mesh, registry.get("mamba"))
    model.to_empty(device="cpu")
    model.init_weights()
    tied = model.lm_head.weight is model.embed.weight
    ref = build(cfg)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(distribute_tensor(ref_params[name].detach(), tp_mesh, p.placements))
    data = batch()
    result = compare(model, ref, step(model, data, tp_mesh.size()), step(ref, data, 1))
    result["tied"] = tied
    return result


def with_fsdp(family: str) -> dict:
    """TP then FSDP2 (parallel/data.py) on a dp_shard=2 x tp=2 mesh, one row per dp rank: the
    gradients equal the single-process step over both rows. FSDP2 averages over dp, so each rank's
    loss is scaled by dp (as the trainer does)."""
    dims = ParallelDims(dp_shard=2, tp=2)
    mesh = dims.build_mesh("cpu")
    cfg = config(family, 2)
    ref = build(cfg)
    model = copy.deepcopy(ref)
    data = batch()
    ref_loss = step(ref, data, 1)
    apply_tensor_parallel(model, mesh["tp"], registry.get(registry.family_of(cfg)))
    apply_fsdp(model, fsdp_mesh(dims, mesh), None)
    row = mesh["dp_shard"].get_local_rank()
    local = {k: v[row : row + 1] for k, v in data.items()}
    with loss_context(2):
        logits = model(local["input_ids"], position_ids=local["position_ids"], doc_ids=local["doc_ids"])
        loss = lm_loss_sum(logits, local["labels"]) / (data["labels"] != IGNORE_INDEX).sum()
        (loss * dims.dp).backward()
    torch.distributed.all_reduce(loss, group=mesh["dp_shard"].get_group())
    return compare(model, ref, loss.detach(), ref_loss)


def errors_raised(tp_mesh) -> dict:
    """Messages of a layout the shapes forbid (before any work) and of a sequence SP cannot split."""
    found = {}
    bad = TransformerConfig(vocab_size=V, d_model=24, n_layers=1, n_heads=3, ffn_hidden=24)
    try:
        apply_tensor_parallel(build(bad), tp_mesh, registry.get("transformer"))
    except LayoutError as error:
        found["layout"] = str(error)
    model = apply_tensor_parallel(build(config("transformer", 2)), tp_mesh, registry.get("transformer"))
    try:
        model(batch()["input_ids"][:, :15])
    except ValueError as error:
        found["seq_len"] = str(error)
    return found


def _all_cases(rank, world):
    tp2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
    tp4 = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))["tp"]
    results = {(f, 2, True): against_single_process(f, tp2, True) for f in FAMILIES}
    results["hybrid", 2, False] = against_single_process("hybrid", tp2, False)
    results.update({(f, 4, True): against_single_process(f, tp4, True) for f in FAMILIES})
    results["meta"] = meta_init_then_step(tp2)
    results["fsdp"] = with_fsdp("hybrid")
    results["errors"] = errors_raised(tp2)
    return results


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_all_cases, 4)


def check_matches_single_process(result: dict, sequence_parallel: bool) -> None:
    loss, ref_loss = result["loss"]
    assert abs(loss - ref_loss) <= TOLERANCE * abs(ref_loss), (loss, ref_loss)
    worst = max(result["grad_err"], key=result["grad_err"].get)
    assert result["grad_err"][worst] <= TOLERANCE, (worst, result["grad_err"][worst])
    assert result["same_names"]
    assert result["misplaced"] == []  # every gradient has its parameter's placements
    if sequence_parallel:
        assert result["plain"] == []  # every parameter is a DTensor on the tp mesh
    else:  # only the norms stay plain modules, computed whole on every rank
        assert all(name.endswith("norm.weight") for name in result["plain"]), result["plain"]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_single_process(runs, family, tp):
    per_rank = [r[(family, tp, True)] for r in runs]
    for result in per_rank:
        check_matches_single_process(result, True)
    assert len({r["loss"] for r in per_rank}) == 1


def test_hybrid_without_sequence_parallel_matches_single_process(runs):
    for result in runs:
        check_matches_single_process(result[("hybrid", 2, False)], False)


def test_weights_are_sharded_where_the_plan_says(runs):
    hybrid = runs[0][("hybrid", 2, True)]["sharded"]
    mixers = ["0.mixer.in_proj_B.weight", "0.mixer.A_log", "0.mixer.norm.weight", "1.mixer.k_proj.weight",
              "2.mixer.down_proj.weight", "3.mixer.x_proj.weight", "3.mixer.conv_weight", "3.mixer.dt_proj.bias"]
    assert {"embed.weight", *(f"layers.{name}" for name in mixers)} <= set(hybrid)
    # Replicated: the norms and Mamba-2's small conv (each rank convolves its channels' rows).
    assert not {"norm.weight", "layers.0.norm.weight", "layers.0.mixer.conv_weight"} & set(hybrid)
    assert "lm_head.weight" in runs[0][("mamba1", 2, True)]["sharded"]
    gelu = runs[0][("hybrid-gelu-nopos", 2, True)]["sharded"]
    assert {"layers.2.mixer.fc1.weight", "layers.2.mixer.fc2.weight"} <= set(gelu)


def test_meta_built_model_initializes_under_tp(runs):
    for result in (r["meta"] for r in runs):
        check_matches_single_process(result, True)
        assert result["tied"]


def test_composes_with_fsdp(runs):
    for result in (r["fsdp"] for r in runs):
        check_matches_single_process(result, True)


def test_bad_layouts_fail_with_what_to_change(runs):
    errors = runs[0]["errors"]
    assert "tp=2 does not divide n_heads=3; valid tp: 1, 3" in errors["layout"]
    assert "needs the sequence length to be a multiple of 2, got 15" in errors["seq_len"]


def test_loss_contexts_nest():
    """The trainer's validation opens one around PipelineRunner.loss_sum, which opens its own (tp x pp
    crashed there: torch's loss_parallel() is not reentrant); a failing body leaves them balanced."""
    with loss_context(2):
        with loss_context(2):
            pass
    with pytest.raises(ZeroDivisionError), loss_context(2):
        1 / 0
    with loss_context(2), loss_context(2):
        pass


def test_layout_is_validated_before_any_process_starts():
    transformer, mamba = registry.get("transformer"), registry.get("mamba")
    six_heads = TransformerConfig(vocab_size=V, d_model=48, n_heads=6, ffn_hidden=96)
    with pytest.raises(LayoutError, match=r"tp=4 does not divide n_heads=6; valid tp: 1, 2, 3, 6"):
        ParallelDims(tp=4).validate(4, tp_shape_limits(six_heads, transformer))
    one_group = MambaConfig(vocab_size=V, d_model=16, layer_pattern="M", headdim=4, ngroups=1)
    with pytest.raises(LayoutError, match=r"tp=2 does not divide ngroups=1; valid tp: 1$"):
        ParallelDims(tp=2).validate(2, tp_shape_limits(one_group, mamba))
    with pytest.raises(LayoutError, match=r"tp=3 does not divide ffn_hidden=64; valid tp: 1, 2, 4, 8, 16, 32, 64"):
        ParallelDims(tp=3).validate(3, tp_shape_limits(TransformerConfig(n_heads=6, ffn_hidden=64), transformer))
    with pytest.raises(LayoutError, match=r"tp=4 does not divide seq_len=6; valid tp: 1, 2, 3, 6"):
        ParallelDims(tp=4).validate(4, tp_shape_limits(config("mamba1", 4), mamba, seq_len=6))
    ParallelDims(tp=4).validate(4, tp_shape_limits(config("mamba1", 4), mamba, seq_len=6, sequence_parallel=False))
    ParallelDims(tp=4, dp_shard=2).validate(8, tp_shape_limits(config("hybrid", 4), mamba, seq_len=128))
