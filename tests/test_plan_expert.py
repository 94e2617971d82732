"""The planner knows expert parallelism: MoE recipes list ep layouts (ep dividing dp_shard x cp,
with pp and tp too), the experts' weights, gradients and AdamW moments are divided by dp_shard x
cp and tp (and not gathered with their block; with ep < dp_shard x cp the E / ep experts a rank
computes with are held for the backward), the all-to-all volume is reported, and dense models get
no ep layouts."""

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
    got = {(x.pp, x.dp_replicate, x.dp_shard, x.cp, x.tp, x.ep) for x in moe}
    assert {(1, 1, 4, 1, 1, 2),  # ep below dp_shard: two groups of 2 ranks
            (2, 1, 2, 1, 1, 2),  # each pipeline stage's experts over its 2 dp_shard ranks
            (1, 1, 2, 1, 2, 2),  # ep x tp: the experts' width split by tp
            (1, 1, 4, 1, 1, 4), (1, 1, 2, 2, 1, 4), (1, 1, 2, 2, 1, 2), (1, 2, 2, 1, 1, 2)} <= got
    for x in moe:  # every ep that divides dp_shard x cp, where that divides the experts
        shard = x.dp_shard * x.cp
        assert x.zero == 3 and shard % x.ep == 0 and 4 % shard == 0
    assert len(got) == len({(x.pp, x.dp_replicate, x.dp_shard, x.cp, x.tp) for x in moe if x.ep == 2}) + \
        len([1 for x in got if x[5] == 4])
    six = [x for x in layouts(4, n_experts=6) if x.ep > 1]  # 6 experts: only 2 ranks can store 3 each
    assert six and all(x.dp_shard * x.cp == 2 for x in six)
    assert not [x for x in layouts(4) if x.ep > 1]


def test_tp_halves_the_experts_per_rank():
    """tp splits every expert's width (parallel/expert.py), so a MoE model's weights per rank halve."""
    facts = _tiny_moe_facts()
    one = estimate(Layout(), facts, _setup(gpus=1))
    tp2 = estimate(Layout(tp=2), facts, _setup(gpus=2))
    assert tp2.weights == one.weights / 2 and tp2.gradients == one.gradients / 2
    ep2 = estimate(Layout(dp_shard=2, ep=2, zero=3), facts, _setup(gpus=2))
    ep2tp2 = estimate(Layout(dp_shard=2, tp=2, ep=2, zero=3), facts, _setup(gpus=4))
    assert ep2tp2.weights == ep2.weights / 2


def test_ep_below_dp_shard_stores_a_quarter_and_holds_the_gathered_half():
    facts, setup = _tiny_moe_facts(), _setup()
    ep4 = estimate(Layout(dp_shard=4, ep=4, zero=3), facts, setup)
    ep2 = estimate(Layout(dp_shard=4, ep=2, zero=3), facts, setup)
    assert ep2.fits and ep2.weights == ep4.weights and ep2.optimizer == ep4.optimizer
    # the E / 2 experts each rank computes with, gathered per MoE layer and saved for the backward
    assert ep2.activations - ep4.activations == 4.0 * sum(facts.expert_elements) / 2
    assert ep2.all_to_all == ep4.all_to_all * (1 / 2) / (3 / 4)
    odd = estimate(Layout(dp_shard=4, ep=2, zero=3), facts.__class__(**{**facts.__dict__, "n_experts": 6}), setup)
    assert odd.problems and "make dp_shard x cp a divisor of 6" in odd.problems[0]


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
    assert ep_rows and all((int(r[2]) * int(r[3])) % int(r[5]) == 0 and float(r[14]) > 0 for r in ep_rows)
    assert {int(r[5]) for r in ep_rows} == {2, 4, 8}
    assert any(int(r[5]) < int(r[2]) * int(r[3]) for r in ep_rows)  # ep groups smaller than dp_shard x cp
    assert any(int(r[0]) > 1 for r in ep_rows)  # and ep with pp
