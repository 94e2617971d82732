"""Tensor parallelism of the MoE layers in the later families (ParaRNN's `E` blocks with the rmoe
router, Titans' MoE FFN, the depth family's MoE MLPs inside the looped core and the ACT loop): at
tp = 2 with sequence parallelism, through parallel/apply.py (the transformer's moe_styles, the
experts' width split by parallel/expert.py), the loss and every gradient equal the single-process
step, router losses on. One spawn of 2 processes; the Trainer-level layouts are the transformer MoE
rows of tests/distributed/layouts.py."""

from __future__ import annotations

import copy

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.test_tensor_parallel import V, batch, build, check_matches_single_process, compare, step
from undertow.models import registry
from undertow.models.depth.config import DepthConfig
from undertow.models.moe.config import MoEConfig
from undertow.models.pararnn.config import ParaRNNConfig
from undertow.models.titans.config import TitansConfig
from undertow.parallel.apply import parallelize
from undertow.parallel.mesh import ParallelDims

MOE = dict(n_experts=4, top_k=2, router_dim=8, expert_hidden=24, aux_loss_coef=0.1, z_loss_coef=0.01)


def config(case: str):
    if case == "pararnn-rmoe":
        return ParaRNNConfig(vocab_size=V, d_model=16, layer_pattern="gE*E", heads=2, attn_heads=2, ffn_hidden=32,
                             chunk_size=4, init_std=0.1, moe=MoEConfig(router="rmoe", **MOE))
    if case.startswith("titans"):
        variant, router = case.split("-")[1:]
        return TitansConfig(vocab_size=V, d_model=16, n_layers=2, variant=variant, n_heads=2, mem_heads=2,
                            chunk_size=2, segment_len=4, window=3, persistent_tokens=2, ffn_hidden=32, init_std=0.1,
                            moe=MoEConfig(router=router, **MOE))
    arch = case.split("-")[1]
    return DepthConfig(arch=arch, vocab_size=V, d_model=16, n_heads=2, ffn_hidden=32, max_steps=3, n_prelude=1,
                       n_core=1, n_coda=1, depth_distribution="fixed", mean_depth=2, max_depth=4, backprop_depth=2,
                       init_std=0.1, moe=MoEConfig(**MOE))


CASES = ("pararnn-rmoe", "titans-mac-rmoe", "titans-mal-linear", "depth-ut", "depth-huginn")


def against_single_process(case: str) -> dict:
    cfg = config(case)
    ref = build(cfg)
    model = copy.deepcopy(ref)
    for m in (ref, model):
        if hasattr(m, "set_training_step"):
            m.set_training_step(0)
    data = batch()
    ref_loss = step(ref, data, 1)
    dims = ParallelDims(tp=2)
    family = type(cfg).__name__.removesuffix("Config").lower()
    parallelize(model, registry.get(family), dims, dims.build_mesh("cpu"))
    return compare(model, ref, step(model, data, 2), ref_loss)


def _cases(rank, world):
    return {case: against_single_process(case) for case in CASES}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_cases, 2)


@pytest.mark.parametrize("case", CASES)
def test_moe_layers_at_tp2_match_single_process(runs, case):
    per_rank = [r[case] for r in runs]
    for result in per_rank:
        check_matches_single_process(result, True)
        assert any(".w_gate" in name for name in result["sharded"])  # the experts' width is split
    assert len({r["loss"] for r in per_rank}) == 1
