"""The planner knows expert parallelism: MoE recipes list ep layouts, the experts' weights,
gradients and AdamW moments are divided by ep (and never gathered), the all-to-all volume is
reported, and dense models get no ep layouts."""

from __future__ import annotations

import torch

from undertow.cli import main
from undertow.planning.layouts import layouts
from undertow.planning.memory import GIB, Layout, Setup, estimate
from undertow.planning.summary import model_facts
from undertow.pretrain.config import load_config


def _tiny_moe_facts():
    cfg = load_config("tiny-moe", ["--model.vocab_size", "64", "--model.d_model", "16", "--model.n_layers", "2",
                                   "--model.n_heads", "2", "--model.moe.n_experts", "4",
                                   "--model.moe.expert_hidden", "8", "--model.moe.top_k", "2"])
    return model_facts(cfg, 64, torch.bfloat16, base_len=16)


def _setup(gpus: int = 4) -> Setup:
    return Setup(gpus=gpus, gpu_memory=80 * GIB, seq_len=64, global_batch=8, micro_batch=1, mfu=0.5,
                 peak_tflops=1000.0, reserve=0.0)


def test_expert_facts_come_from_the_layers_hook():
    facts = _tiny_moe_facts()
    assert facts.n_experts == 4
    assert facts.expert_elements == [3 * 4 * 16 * 8] * 2  # w_gate, w_up, w_down of 4 experts per block
    assert facts.routed_per_token == 2 * (2 * 16)  # two layers of top-2 x d_model


def test_ep_layouts_listed_for_moe_models_only():
    moe = [x for x in layouts(4, n_experts=4) if x.ep > 1]
    assert {(x.dp_replicate, x.dp_shard, x.cp, x.tp, x.ep) for x in moe} == {
        (2, 2, 1, 1, 2), (1, 2, 1, 2, 2), (1, 4, 1, 1, 4), (1, 2, 2, 1, 4), (1, 1, 2, 2, 2), (2, 1, 2, 1, 2),
        (1, 1, 4, 1, 4)}
    assert all(x.zero == 3 and x.pp == 1 and x.ep == x.dp_shard * x.cp for x in moe)
    assert not [x for x in layouts(4, n_experts=6) if x.ep == 4]  # 4 does not divide 6 experts
    assert not [x for x in layouts(4) if x.ep > 1]


def test_experts_divided_by_ep_and_all_to_all_reported():
    facts, setup = _tiny_moe_facts(), _setup()
    fsdp = estimate(Layout(dp_shard=4, zero=3), facts, setup)
    ep = estimate(Layout(dp_shard=4, ep=4, zero=3), facts, setup)
    assert fsdp.fits and ep.fits
    experts = sum(facts.expert_elements)
    # both split the experts by 4; ep gathers no experts with the running blocks (2 blocks in flight)
    gathered = 2 * 4.0 * facts.expert_elements[0]
    assert fsdp.weights - ep.weights == gathered
    assert ep.gradients == fsdp.gradients and ep.optimizer == fsdp.optimizer
    assert fsdp.all_to_all == 0
    tokens_per_rank = 8 * 64 / 4
    assert ep.all_to_all == 4 * tokens_per_rank * facts.routed_per_token * 2 * 3 / 4  # bf16, 3/4 leaves
    assert experts > 0
    dense = estimate(Layout(dp_shard=4, ep=4, zero=3), facts.__class__(**{**facts.__dict__, "n_experts": 0,
                                                                          "expert_elements": []}), setup)
    assert dense.problems == ["ep=4: the model has no MoE layers"]
    odd = estimate(Layout(dp_shard=3, ep=3, zero=3), facts, _setup(gpus=3))
    assert any("ep=3 does not divide n_experts=4" in p for p in odd.problems)


def test_plan_of_a_moe_recipe_lists_ep_layouts(capsys):
    assert main(["plan", "olmoe-1b-7b", "--gpus", "8", "--top", "0"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("pp"))
    assert " ep " in header and "a2a GiB" in header
    rows = [r for r in map(str.split, out.splitlines()) if len(r) >= 17 and all(c.isdigit() for c in r[:6])]
    ep_rows = [r for r in rows if int(r[5]) > 1]  # columns pp dp_r dp_s cp tp ep ...
    assert ep_rows and all(int(r[5]) == int(r[2]) * int(r[3]) and float(r[14]) > 0 for r in ep_rows)
    assert {int(r[5]) for r in ep_rows} == {2, 4, 8}
