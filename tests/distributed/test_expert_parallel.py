"""Expert parallelism (parallel/expert.py): the all-to-all dispatch equals kernels/moe on one device
(outputs, input and routing-weight gradients, every expert's gradient), also when a rank receives
no tokens; a parallelized MoE transformer keeps E/ep experts per rank outside FSDP2 and computes
what one process does; bad layouts refused at config load.

An ep2 checkpoint resumes in one process, and a one-process checkpoint under ep2. The whole training life under ep (step, AdamW,
validation, save/resume in the same layout) is the layout harness's moe row
(tests/distributed/layouts.py: ep2, ep4, hsdp2x2xep2), run by test_data_parallel.py.
"""

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_distributed
from tests.distributed.layouts import LAYOUTS, advance, global_batch, make_config, rows_of, trained_state
from undertow.configtools import ConfigError
from undertow.kernels.moe import moe_experts
from undertow.models import registry
from undertow.parallel.apply import parallelize
from undertow.parallel.expert import WIDTH_DIMS, ExpertDispatch
from undertow.parallel.mesh import LayoutError, ParallelDims
from undertow.pretrain.config import load_config
from undertow.pretrain.trainer import Trainer

E, K, D, H, N = 4, 2, 8, 6, 10


def _inputs(rank: int, skewed: bool):
    """Rank `rank`'s tokens (N, D), expert ids (N, K) and weights (N, K); skewed: every token of
    every rank goes to experts 0 and 1 (rank 0's), so rank 1 receives nothing."""
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, D, generator=gen)
    if skewed:
        idx = torch.tensor([[0, 1], [1, 0]]).repeat(N // 2, 1)
    else:
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=gen) + 0.1
    return x, idx, w / w.sum(-1, keepdim=True)


def _weights():
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=gen) for shape in ((E, D, H), (E, D, H), (E, H, D))]


def _dispatch(rank, world):
    return {skewed: _dispatch_one(rank, world, skewed) for skewed in (False, True)}


def _dispatch_one(rank, world, skewed):
    x, idx, w = _inputs(rank, skewed)
    x.requires_grad_(), w.requires_grad_()
    local = [p.chunk(world)[rank].clone().requires_grad_() for p in _weights()]
    out = ExpertDispatch(dist.group.WORLD, E, 1.0)(x, idx, w, *local)
    (out * torch.cos(torch.arange(out.numel()).view_as(out) + rank)).sum().backward()
    return {"out": out.detach(), "x": x.grad, "w": w.grad, "experts": [p.grad for p in local]}


def _split_dispatch(rank, world, how):
    """how = "tp": every rank holds all E experts' width slice h/2, the same tokens (rank 0's), and the
    partial outputs are summed (tensor parallelism inside the experts). how = "gather": each rank
    stores E/2 experts, both gather all E and compute their own tokens (the replicas of ep < dp_shard
    x cp, here with an ep group of one rank)."""
    x, idx, w = _inputs(0 if how == "tp" else rank, skewed=False)
    x.requires_grad_(), w.requires_grad_()
    if how == "tp":
        local = [p.chunk(world, dim)[rank].clone().requires_grad_() for p, dim in zip(_weights(), WIDTH_DIMS)]
        dispatch = ExpertDispatch(None, E, tp_group=dist.group.WORLD)
    else:
        local = [p.chunk(world)[rank].clone().requires_grad_() for p in _weights()]
        alone = [dist.new_group([r]) for r in range(world)][rank]  # collective: every rank creates each
        dispatch = ExpertDispatch(alone, E, 1.0, gather_group=dist.group.WORLD)
    out = dispatch(x, idx, w, *local)
    shift = 0 if how == "tp" else rank  # tp: one loss, the same on every rank
    (out * torch.cos(torch.arange(out.numel()).view_as(out) + shift)).sum().backward()
    return {"out": out.detach(), "x": x.grad, "w": w.grad, "experts": [p.grad for p in local]}


def _spawned(rank, world, root):
    """Everything this file runs in 2 processes, in one spawn (starting processes is the slow part)."""
    resumed = Trainer(make_config("moe", f"{root}/single", LAYOUTS["ep2"] + ["--checkpoint.resume", "auto"]))
    return {"dispatch": _dispatch(rank, world), "forward": _parallel_forward(rank, world),
            "tp_forward": _parallel_forward(rank, world, tp=True),
            "split": {how: _split_dispatch(rank, world, how) for how in ("tp", "gather")},
            "saved": _ep2_saves(rank, world, root), "resumed_single": (resumed.step, trained_state(resumed))}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ep"))
    single = _saves(f"{root}/single", [])  # one process writes step 1: ep2 resumes it in the spawn
    return root, run_distributed(_spawned, 2, root, retry_crash=False), single


@pytest.fixture(scope="module")
def dispatched(spawned):
    return [r["dispatch"] for r in spawned[1]]


@pytest.mark.parametrize("skewed", [False, True], ids=["random", "one-rank-idle"])
def test_dispatch_equals_one_device(dispatched, skewed):
    world = 2
    got = [per_rank[skewed] for per_rank in dispatched]
    full = [p.requires_grad_() for p in _weights()]
    for rank in range(world):  # one device: every rank's tokens through all experts, losses summed
        x, idx, w = _inputs(rank, skewed)
        x.requires_grad_(), w.requires_grad_()
        out = moe_experts(x, idx, w, *full)
        (out * torch.cos(torch.arange(out.numel()).view_as(out) + rank)).sum().backward()
        torch.testing.assert_close(got[rank]["out"], out.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[rank]["x"], x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[rank]["w"], w.grad, rtol=1e-5, atol=1e-6)
    for i, p in enumerate(full):  # rank r's expert gradients: the sum over every rank's tokens
        torch.testing.assert_close(torch.cat([g["experts"][i] for g in got]), p.grad, rtol=1e-5, atol=1e-5)
    if skewed:
        assert all(bool((g == 0).all()) for g in got[1]["experts"])


def _model(overrides):
    cfg = load_config("tiny-moe", ["--model.vocab_size", "64", "--model.d_model", "16", "--model.n_layers", "2",
                                   "--model.n_heads", "2",
                                   "--model.moe.n_experts", "4", "--model.moe.expert_hidden", "8", *overrides])
    spec = registry.get(cfg.family)
    torch.manual_seed(0)
    model = spec.model_cls(cfg.model)
    model.init_weights()
    return model, spec, cfg


def _parallel_forward(rank, world, tp=False):
    """ep2 (dp_shard 2), or tp2: the experts' width split, every rank with the same tokens."""
    layout = ["--parallel.tp", "2"] if tp else ["--parallel.dp_shard", "2", "--parallel.ep", "2"]
    model, spec, _ = _model(layout)
    dims = ParallelDims(tp=2) if tp else ParallelDims(dp_shard=2, ep=2)
    parallelize(model, spec, dims, dims.build_mesh("cpu"))
    layer = model.layers[0].mlp
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0 if tp else rank))
    logits = model(ids)
    return {"local": tuple(layer.w_gate.to_local().shape), "placements": str(layer.w_gate.placements),
            "down": (tuple(layer.w_down.to_local().shape), str(layer.w_down.placements)),
            "fsdp_managed": hasattr(layer.router.gate.weight, "to_local"),
            "logits": (logits.full_tensor() if hasattr(logits, "full_tensor") else logits).detach(), "ids": ids}


def test_parallelized_model_holds_its_experts_and_computes_like_one_process(spawned):
    got = [r["forward"] for r in spawned[1]]
    model, _, cfg = _model([])
    for rank, g in enumerate(got):
        assert g["local"] == (2, 16, 8)  # E / ep experts, whole (FSDP2 did not shard them further)
        assert g["placements"] == "(Shard(dim=0),)" and g["fsdp_managed"]
        with torch.no_grad():
            torch.testing.assert_close(g["logits"], model(g["ids"]), rtol=1e-5, atol=1e-5)


def test_tensor_parallel_experts_hold_half_the_width_and_compute_like_one_process(spawned):
    got = [r["tp_forward"] for r in spawned[1]]
    model, _, _ = _model([])
    for g in got:
        assert g["local"] == (4, 16, 4) and g["placements"] == "(Shard(dim=2),)"  # h = 8 over 2 ranks
        assert g["down"] == ((4, 4, 16), "(Shard(dim=1),)")
        with torch.no_grad():
            torch.testing.assert_close(g["logits"], model(g["ids"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["tp", "gather"])
def test_split_experts_equal_one_device(spawned, how):
    """Width slices (tp) or gathered expert slices (the replicas of ep < dp_shard x cp): outputs,
    token and routing-weight gradients as one device; each rank's slice gradient is its part of
    the gradient over every rank's tokens (tp: rank 0's tokens once)."""
    got = [r["split"][how] for r in spawned[1]]
    world = len(got)
    full = [p.requires_grad_() for p in _weights()]
    for rank in range(world if how == "gather" else 1):
        x, idx, w = _inputs(rank, skewed=False)
        x.requires_grad_(), w.requires_grad_()
        out = moe_experts(x, idx, w, *full)
        (out * torch.cos(torch.arange(out.numel()).view_as(out) + rank)).sum().backward()
        ranks = [rank] if how == "gather" else range(world)  # tp: every rank holds rank 0's tokens
        for r in ranks:
            torch.testing.assert_close(got[r]["out"], out.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[r]["x"], x.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[r]["w"], w.grad, rtol=1e-5, atol=1e-6)
    for i, (p, dim) in enumerate(zip(full, WIDTH_DIMS)):
        parts = [g["experts"][i] for g in got]
        torch.testing.assert_close(torch.cat(parts, dim=dim if how == "tp" else 0), p.grad, rtol=1e-5, atol=1e-5)


def _ep2_saves(rank, world, root):
    return _saves(f"{root}/ep2", LAYOUTS["ep2"])


def _saves(run_dir, layout):
    """The layout harness's moe row: one step, the AdamW step, a checkpoint of step 1."""
    trainer = Trainer(make_config("moe", run_dir, layout))
    trainer.train_step([rows_of(trainer, global_batch(trainer.cfg.model.vocab_size))])
    advance(trainer)
    trainer.save()
    return trained_state(trainer)


def test_ep2_checkpoint_resumes_in_one_process(spawned):
    """DCP reshards the experts (saved as E/ep-row shards by each rank) into one process's whole
    tensors: every parameter and AdamW moment as the ep2 run had them."""
    root, got, _ = spawned
    resumed = Trainer(make_config("moe", f"{root}/ep2", ["--checkpoint.resume", "auto"]))
    assert resumed.step == 1
    restored = trained_state(resumed)
    assert restored.keys() == got[0]["saved"].keys()
    assert any(name.endswith("w_gate") for name in restored)
    for name, tensors in restored.items():
        for a, b in zip(tensors, got[0]["saved"][name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_one_process_checkpoint_resumes_under_ep2(spawned):
    """The other way: each ep2 rank loads its experts' rows of the one-process checkpoint."""
    _, got, single = spawned
    for rank in got:
        step, restored = rank["resumed_single"]
        assert step == 1 and restored.keys() == single.keys()
        for name, tensors in restored.items():
            for a, b in zip(tensors, single[name]):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("overrides,message", [
    (["--parallel.ep", "2"], r"ep must divide parallel.dp_shard = 1; valid ep: 1 \(or set --parallel.dp_shard 2\)"),
    (["--parallel.ep", "3", "--parallel.dp_shard", "4"], "must divide parallel.dp_shard = 4; valid ep: 1, 2, 4"),
    (["--parallel.ep", "3", "--parallel.dp_shard", "2", "--parallel.cp", "2"],
     "ep must divide parallel.dp_shard x parallel.cp = 4; valid ep: 1, 2, 4"),
    (["--parallel.ep", "3", "--parallel.dp_shard", "3"], r"n_experts = 8 \(valid: 1, 2, 4, 8\)"),
    # ep < dp_shard: each of the 16 ranks would store 8 / 16 experts
    (["--parallel.ep", "2", "--parallel.dp_shard", "16"], "make dp_shard x cp a divisor of 8"),
    (["--parallel.ep", "0"], "must be an integer >= 1"),
])
def test_bad_layouts_refused_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-moe", overrides)


def test_ep_without_moe_layers_refused():
    with pytest.raises(ConfigError, match="has no MoE layers"):
        load_config("tiny", ["--parallel.ep", "2", "--parallel.dp_shard", "2"])
    with pytest.raises(LayoutError, match="ep must divide parallel.dp_shard = 2; valid ep: 1, 2"):
        ParallelDims(dp_shard=2, ep=4).validate(2)
    dims = ParallelDims(dp_shard=2, ep=2)
    assert dims.world_size == 2 and dims.describe() == "dp_shard2 x ep2"
    ParallelDims(dp_shard=2, cp=2, tp=2, ep=4).validate(8)


@pytest.mark.parametrize("overrides", [
    ["--parallel.ep", "2", "--parallel.dp_shard", "4"],  # two groups of ep 2 (experts stored by 4 ranks)
    ["--parallel.ep", "2", "--parallel.dp_shard", "2", "--parallel.cp", "2"],
    ["--parallel.ep", "2", "--parallel.dp_shard", "2", "--parallel.pp", "2", "--parallel.pp_microbatches", "2"],
    ["--parallel.ep", "2", "--parallel.dp_shard", "2", "--parallel.tp", "2"],
])
def test_layouts_beyond_ep_equal_dp_shard_load(overrides):
    assert load_config("tiny-moe", overrides).parallel.ep == 2


def test_tp_must_divide_the_expert_width_before_any_process_starts():
    """tp splits every expert's width: the family's shape limits say so (checked by the trainer and
    `undertow launch` before any work), for the transformer's MoE MLP and a Mamba pattern's E."""
    cfg = load_config("tiny-moe", ["--model.moe.expert_hidden", "5", "--parallel.tp", "2"])
    with pytest.raises(LayoutError, match=r"tp=2 does not divide the expert width \(model.moe.expert_hidden\)=5; "
                                          r"valid tp: 1, 5"):
        ParallelDims(tp=2).validate(2, cfg.layout_limits())
    mamba = load_config("tiny-mamba2", ["--model.layer_pattern", "ME", "--model.moe.n_experts", "4",
                                        "--model.moe.expert_hidden", "6"])
    assert ("tp", "the expert width (model.moe.expert_hidden)", 6) in registry.get("mamba").shape_limits(mamba.model)
