"""`undertow plan RECIPE --gpus N`: the layout model's rules on a hand-made model, and the 7B recipes."""

from __future__ import annotations

import re

import pytest
import torch

from undertow.cli import main
from undertow.parallel.pipeline_split import StageCosts
from undertow.planning.layouts import layouts, plan_layouts
from undertow.planning.memory import (
    GIB,
    Layout,
    ModelFacts,
    Setup,
    estimate,
    split_stages,
)
from undertow.models.profile import ModelProfile, Piece

MIB = 2**20


def _facts(blocks: int = 8, block_params: int = 1000 * MIB // 16) -> ModelFacts:
    """A model of `blocks` equal blocks (own parameters, 1 MiB saved per token, 64 KiB input per
    token, 10 MiB per micro-batch) between an embedding and a head that share one weight."""
    numel = {0: 2 * block_params, **{1 + i: block_params for i in range(blocks)}}
    pieces = [Piece("pre", frozenset({0}), per_token=1024.0)]
    pieces += [
        Piece(f"block {i}", frozenset({1 + i}), per_microbatch=10 * MIB, per_sequence=4096.0, per_token=MIB,
              input_per_token=64 * 1024.0)
        for i in range(blocks)
    ]
    pieces.append(Piece("post", frozenset({0}), per_token=2 * MIB))
    profile = ModelProfile(pieces=pieces, numel=numel, compute_dtype=torch.bfloat16)
    return ModelFacts(profile=profile, flops_per_token=6.0e9, stage_costs=StageCosts([1.0] * blocks),
                      state_elements=[1000] * blocks, shape_limits=[("tp", "n_heads", 32)])


def _setup(gpus: int = 8, **kw) -> Setup:
    base = {"gpus": gpus, "gpu_memory": 80 * GIB, "seq_len": 1024, "global_batch": 64, "micro_batch": 1,
            "mfu": 0.5, "peak_tflops": 1000.0, "reserve": 3 * GIB}
    return Setup(**{**base, **kw})


def test_layouts_cover_every_factorization_once():
    all8 = list(layouts(8))
    assert len(set(all8)) == len(all8)
    degrees = {(x.pp, x.dp_replicate, x.dp_shard, x.cp, x.tp) for x in all8}
    assert len(degrees) == 35  # 3 factors of 2 over 5 dimensions: C(7, 4)
    assert all(x.zero == 0 for x in all8 if x.dp_shard * x.cp == 1)
    assert {x.zero for x in all8 if x.dp_shard == 8} == {1, 2, 3}


def test_zero_stages_shard_optimizer_then_gradients_then_weights():
    facts, setup = _facts(), _setup()
    params = facts.profile.parameters(facts.profile.pieces)[0]
    tensors = facts.profile.parameters(facts.profile.pieces)[1]
    by_stage = {z: estimate(Layout(dp_shard=8, zero=z), facts, setup) for z in (1, 2, 3)}
    assert by_stage[1].optimizer == 8 * params / 8 + 4 * tensors
    assert by_stage[1].gradients == 4 * params and by_stage[1].weights == 4 * params
    assert by_stage[2].gradients == 4 * params / 8 and by_stage[2].weights == 4 * params
    # ZeRO-3 adds the unsharded float32 parameters of the running and the prefetched block.
    assert by_stage[3].weights == 4 * params / 8 + 2 * 4 * (1000 * MIB // 16)
    replicated = estimate(Layout(dp_replicate=8), facts, setup)
    assert replicated.optimizer == 8 * params + 4 * tensors


def test_tensor_and_context_parallelism_split_activations():
    facts, setup = _facts(), _setup(global_batch=8)
    plain = estimate(Layout(dp_replicate=8), facts, setup)
    tp4 = estimate(Layout(dp_replicate=2, tp=4), facts, setup)
    cp4 = estimate(Layout(dp_replicate=2, cp=4, zero=1), facts, setup)
    assert tp4.activations == pytest.approx(plain.activations / 4)
    assert tp4.weights == pytest.approx(plain.weights / 4)
    # cp=4: each rank runs 256 of the 1024 tokens.
    quarter = [p.saved_bytes(1, 256) for p in facts.profile.pieces]
    assert cp4.activations == pytest.approx(sum(quarter) + max(quarter))
    assert cp4.states == 4 * sum(2 * 4 * n for n in facts.state_elements)  # all cp ranks' states, every block
    assert plain.states == 0


def test_activation_checkpointing_keeps_block_inputs_and_costs_a_forward():
    facts, setup = _facts(), _setup()
    off = estimate(Layout(dp_replicate=8), facts, setup)
    on = estimate(Layout(dp_replicate=8, ac=True), facts, setup)
    prof, b, t = facts.profile, 1, 1024
    block = prof.blocks[0].saved_bytes(b, t)
    outside = prof.pieces[0].saved_bytes(b, t) + prof.pieces[-1].saved_bytes(b, t)
    largest = max(p.saved_bytes(b, t) for p in prof.pieces)
    assert on.activations == pytest.approx(8 * 64 * 1024 * t + outside + block + largest)
    assert off.activations == pytest.approx(prof.saved_bytes(b, t) + largest)
    assert on.step_time == pytest.approx(off.step_time * 4 / 3)


def test_pipeline_splits_blocks_keeps_micro_batches_in_flight_and_pays_a_bubble():
    facts, setup = _facts(), _setup(global_batch=16)
    flat = estimate(Layout(dp_replicate=8), facts, setup)
    pp4 = estimate(Layout(pp=4, dp_replicate=2), facts, setup)
    # Stage 0 (embedding + 2 blocks) holds 4 micro-batches in flight; the last (2 blocks + head) one.
    assert pp4.weights == pytest.approx(4 * (2 + 2) * (1000 * MIB // 16))
    block = facts.profile.blocks[0].saved_bytes(1, 1024)
    first = 4 * (facts.profile.pieces[0].saved_bytes(1, 1024) + 2 * block) + block
    last = 2 * block + facts.profile.pieces[-1].saved_bytes(1, 1024) + facts.profile.pieces[-1].saved_bytes(1, 1024)
    assert pp4.activations == pytest.approx(max(last, first))
    assert pp4.micro_batches == 8
    assert pp4.step_time == pytest.approx(flat.step_time * (1 + 3 / 8))


def test_split_stages_balances_contiguous_blocks_as_a_run_does():
    assert split_stages(StageCosts([1.0] * 8), 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_stages(StageCosts([3.0, 1.0, 1.0, 1.0]), 2) == [[0], [1, 2, 3]]
    assert split_stages(StageCosts([1.0, 1.0, 1.0, 5.0]), 2) == [[0, 1, 2], [3]]
    # the head's cost on the last stage moves a block to the first, as PipelineRunner splits
    assert split_stages(StageCosts([1.0] * 4, last=2.0), 2) == [[0, 1, 2], [3]]


def test_layouts_that_cannot_run_say_why():
    facts = _facts()
    tp3 = estimate(Layout(dp_replicate=2, tp=3), facts, _setup(gpus=6, global_batch=60))
    assert not tp3.fits and "tp=3 does not divide n_heads=32" in tp3.problems[0]
    pp16 = estimate(Layout(pp=16), facts, _setup(gpus=16))
    assert "pp=16 exceeds layers=8" in pp16.problems[0]
    odd = estimate(Layout(dp_replicate=8), facts, _setup(global_batch=12))
    assert "global batch of 12 sequences does not split into dp=8 x micro-batch 1" in odd.problems[0]
    small = estimate(Layout(dp_replicate=8), facts, _setup(gpu_memory=20 * GIB))
    assert re.fullmatch(r"needs \d+\.\d GiB > 20 GiB", small.problems[0])
    # what the trainer refuses before any work, refused here too: sequence parallelism must split each
    # cp slice of a row over tp, and a family's context limits (Titans: whole segments per cp slice)
    sp = estimate(Layout(cp=4, tp=2), facts, _setup(seq_len=12))
    assert "tp=2 does not divide seq_len / cp=3" in sp.problems[0]
    facts.context_limits = [("cp", "seq_len / segment_len", 3)]
    segments = estimate(Layout(dp_shard=4, cp=2), facts, _setup())
    assert "cp=2 does not divide seq_len / segment_len=3; valid cp: 1, 3" in segments.problems[0]
    assert estimate(Layout(dp_shard=8), facts, _setup()).fits  # no cp: the limit does not apply


def test_plan_sorts_fitting_layouts_by_throughput():
    estimates = plan_layouts(_facts(), _setup(gpu_memory=16 * GIB))
    fits = [e for e in estimates if e.fits]
    assert fits and not all(e.fits for e in estimates)
    assert estimates[: len(fits)] == fits
    speeds = [e.tokens_per_s for e in fits]
    assert speeds == sorted(speeds, reverse=True)
    assert all(e.total <= 16 * GIB for e in fits)


def _best_row(out: str) -> dict[str, str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layouts that fit"))
    spans = [m.span() for m in re.finditer(r"-+", lines[start + 2])]  # the rule under the header
    cells = lambda line: [line[a:b].strip() for a, b in spans]
    return dict(zip(cells(lines[start + 1]), cells(lines[start + 3])))


@pytest.mark.parametrize("recipe", ["falcon-mamba-7b", "codestral-mamba-7b", "mamba2-hybrid-8b"])
def test_every_7b_recipe_has_a_layout_that_fits_8_gpus_of_80gb(recipe, capsys):
    assert main(["plan", recipe, "--gpus", "8", "--gpu-memory", "80GB", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "layouts that do not fit" in out
    best = _best_row(out)
    degrees = [int(best[k]) for k in ("pp", "dp_r", "dp_s", "cp", "tp")]
    assert degrees[0] * degrees[1] * degrees[2] * degrees[3] * degrees[4] == 8
    assert 0 < float(best["total GiB"]) <= 80
    assert float(best["tokens/s"].replace(",", "")) > 0


def test_plan_options_are_validated(capsys):
    assert main(["plan", "tiny", "--gpus", "2", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["plan", "tiny", "--gpus", "2", "--global-batch", "1000"]) == 2
    assert "multiple of seq_len 128" in capsys.readouterr().err
