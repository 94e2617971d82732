"""Pipeline stage split: balanced by layer cost (exact), a hand split honoured and validated, stage
placement on ranks, and parameter names that do not depend on the split."""

import itertools
import random

import pytest
import torch

from undertow.models import registry
from undertow.models.transformer.config import TransformerConfig
from undertow.parallel.mesh import LayoutError
from undertow.parallel.pipeline import LayerSlice, _prune
from undertow.parallel.pipeline_split import (
    StageCosts,
    balance_stages,
    in_flight,
    rank_of_stage,
    resolve_split,
    stage_costs,
    stage_loads,
    stage_memory,
    stages_of_rank,
    with_activation_memory,
)
from undertow.pretrain.config import ConfigError, load_config

HYBRID_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def brute_force_best(costs: StageCosts, n_stages: int) -> float:
    """The smallest heaviest-stage cost over every contiguous split (each stage >= 1 layer)."""
    n = len(costs.layers)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        counts = [b - a for a, b in itertools.pairwise(bounds)]
        best = min(best, max(stage_loads(costs, counts)))
    return best


def hybrid_8b_costs(seq_len: int = 4096) -> StageCosts:
    cfg = load_config("mamba2-hybrid-8b").model
    assert cfg.layer_pattern == HYBRID_8B
    return stage_costs(registry.get("mamba"), cfg, seq_len)


def test_hybrid_8b_split_into_4_stages_is_optimal():
    costs = hybrid_8b_costs()
    counts = balance_stages(costs.layers, 4, costs.first, costs.last)
    assert len(counts) == 4 and sum(counts) == 56 and min(counts) >= 1
    loads = stage_loads(costs, counts)
    assert max(loads) == pytest.approx(brute_force_best(costs, 4), rel=1e-12)
    # near the ideal: an even share of the total plus at most one layer
    total = sum(costs.layers) + costs.first + costs.last
    assert max(loads) <= total / 4 + max(costs.layers)
    # the LM head (256K vocabulary) weighs about as much as several layers: the last stage gets fewer
    assert counts[-1] < counts[0]
    # better than cutting 14 layers per stage
    assert max(loads) < max(stage_loads(costs, [14, 14, 14, 14]))


@pytest.mark.parametrize("seed", range(20))
def test_balance_is_exact_on_random_costs(seed):
    rng = random.Random(seed)
    n, stages = rng.randint(2, 10), rng.randint(1, 4)
    stages = min(stages, n)
    costs = StageCosts([rng.uniform(0.1, 5.0) for _ in range(n)], rng.uniform(0, 3), rng.uniform(0, 3))
    counts = balance_stages(costs.layers, stages, costs.first, costs.last)
    assert sum(counts) == n and min(counts) >= 1 and len(counts) == stages
    assert max(stage_loads(costs, counts)) == pytest.approx(brute_force_best(costs, stages), rel=1e-12)


def test_hand_split_is_honoured_and_validated():
    costs = hybrid_8b_costs()
    assert resolve_split([20, 16, 12, 8], costs, 4) == [20, 16, 12, 8]
    assert resolve_split([], costs, 4) == balance_stages(costs.layers, 4, costs.first, costs.last)
    with pytest.raises(LayoutError, match=r"pp_split = \[28, 28\] has 2 entries.*4 stages"):
        resolve_split([28, 28], costs, 4)
    with pytest.raises(LayoutError, match=r"pp_split = \[20, 16, 12, 7\] holds 55 layers.*sum to 56"):
        resolve_split([20, 16, 12, 7], costs, 4)
    with pytest.raises(LayoutError, match=r"pp_split = \[0, 20, 20, 16\]: every stage needs an integer >= 1"):
        resolve_split([0, 20, 20, 16], costs, 4)
    with pytest.raises(LayoutError, match="5 pipeline stages cannot split 4 layers"):
        balance_stages([1.0] * 4, 5)


def test_stage_placement():
    # loop: stage s on rank s % pp
    assert [stages_of_rank(r, 4, 2, "loop") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # V: rank r holds r and 2 pp - 1 - r; the first and last stage share rank 0
    assert [stages_of_rank(r, 4, 2, "v") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    for style in ("loop", "v"):
        for r in range(4):
            assert all(rank_of_stage(s, 4, style) == r for s in stages_of_rank(r, 4, 2, style))
    with pytest.raises(LayoutError, match="exactly 2 stages per rank"):
        stages_of_rank(0, 4, 3, "v")


def test_pruned_model_keeps_the_full_models_parameter_names():
    cfg = TransformerConfig(vocab_size=32, d_model=16, n_layers=6, n_heads=2, tie_embeddings=False)
    full = registry.build_model(cfg)
    names = set(full.state_dict())
    middle = registry.build_model(cfg)
    _prune(middle, [2, 3, 4], has_first=False, has_last=False)
    assert isinstance(middle.layers, LayerSlice) and middle.layers.indices() == [2, 3, 4]
    assert len(middle.layers) == 3 and middle.layers[3] is list(middle.layers)[1]
    kept = set(middle.state_dict())
    assert kept < names and {k.split(".")[1] for k in kept} == {"2", "3", "4"}
    ends = registry.build_model(cfg)
    _prune(ends, [0, 5], has_first=True, has_last=True)
    assert {"embed.weight", "lm_head.weight", "norm.weight"} <= set(ends.state_dict()) < names
    # every parameter of the full model is in exactly one of three stages' models
    parts = [([0, 1], True, False), ([2, 3], False, False), ([4, 5], False, True)]
    seen = []
    for layer_ids, first, last in parts:
        part = registry.build_model(cfg)
        _prune(part, layer_ids, first, last)
        seen += [n for n, _ in part.named_parameters()]
    assert sorted(seen) == sorted(n for n, _ in full.named_parameters())


def test_zbv_with_fsdp_and_tied_embeddings_is_refused_before_any_work():
    zbv = ["--parallel.pp", "2", "--parallel.pp_schedule", "zbv", "--parallel.pp_virtual_stages", "2"]
    with pytest.raises(ConfigError, match="model.tie_embeddings.*zbv and FSDP"):
        load_config("tiny", zbv + ["--parallel.dp_shard", "2"])
    load_config("tiny", zbv + ["--parallel.dp_shard", "2", "--model.tie_embeddings", "false"])
    load_config("tiny", zbv + ["--parallel.tp", "2"])  # no FSDP: the tied copies are two parameters


def all_splits(n: int, n_stages: int):
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        yield [b - a for a, b in itertools.pairwise((0, *cuts, n))]


def test_memory_budget_moves_layers_off_the_stages_holding_more_micro_batches():
    # 1F1B, 2 stages, 4 micro-batches: stage 0 holds 2 in flight, stage 1 one
    costs = StageCosts([1.0] * 8, memory=[1.0] * 8)
    assert in_flight(0, 2, 4, "1f1b") == 2 and in_flight(1, 2, 4, "1f1b") == 1 and in_flight(0, 2, 4, "gpipe") == 4
    assert resolve_split([], costs, 2) == [4, 4]  # compute only
    assert stage_memory(costs, [4, 4], 4, "1f1b") == [8.0, 4.0]
    assert resolve_split([], costs, 2, budget=6.0, microbatches=4, schedule="1f1b") == [3, 5]
    with pytest.raises(LayoutError, match=r"pp_activation_gib = .*least any split needs .*split \[2, 6\]"):
        resolve_split([], costs, 2, budget=4.0, microbatches=4, schedule="1f1b")
    assert resolve_split([5, 3], costs, 2, budget=1.0) == [5, 3]  # a hand split is the user's


@pytest.mark.parametrize("seed", range(20))
def test_memory_constrained_balance_is_exact_on_random_costs(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(2, 9)
    stages, m = min(rng.randint(1, 4), n), rng.randint(1, 6)
    schedule = rng.choice(["1f1b", "gpipe", "interleaved_1f1b"])
    costs = StageCosts([rng.uniform(0.1, 5.0) for _ in range(n)], rng.uniform(0, 3), rng.uniform(0, 3),
                       memory=[rng.uniform(0.1, 5.0) for _ in range(n)], first_memory=rng.uniform(0, 2),
                       last_memory=rng.uniform(0, 2))
    budget = rng.uniform(2.0, 30.0)
    fitting = [c for c in all_splits(n, stages) if max(stage_memory(costs, c, m, schedule)) <= budget]
    if not fitting:
        with pytest.raises(LayoutError, match="no split"):
            resolve_split([], costs, stages, budget, m, schedule)
        return
    counts = resolve_split([], costs, stages, budget, m, schedule)
    assert max(stage_memory(costs, counts, m, schedule)) <= budget
    best = min(max(stage_loads(costs, c)) for c in fitting)
    assert max(stage_loads(costs, counts)) == pytest.approx(best, rel=1e-12)


def test_activation_memory_is_measured_per_layer():
    cfg = load_config("tiny-hybrid", ["--model.layer_pattern", "mM*-", "--model.d_model", "64",
                                        "--model.vocab_size", "128"]).model
    spec = registry.get("mamba")
    costs = with_activation_memory(stage_costs(spec, cfg, 128), spec, cfg, 2, 128, torch.float32)
    assert len(costs.memory) == 4 and min(costs.memory) > 0 and costs.last_memory > 0
    twice = with_activation_memory(stage_costs(spec, cfg, 128), spec, cfg, 4, 128, torch.float32)
    assert twice.memory == pytest.approx([2 * m for m in costs.memory], rel=0.05)
    ckpt = with_activation_memory(stage_costs(spec, cfg, 128), spec, cfg, 2, 128, torch.float32, checkpointed=True)
    assert all(c < m for c, m in zip(ckpt.memory, costs.memory))
    assert ckpt.memory[0] == pytest.approx(2 * 128 * 64 * 4, rel=0.01)  # a block's float32 input
