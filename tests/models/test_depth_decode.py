"""Huginn inference: cached decoding equal to full forwards at a fixed (test-time) depth, adaptive
exit per token, the core's cache shared across steps, and the diagonal sampler returning the
sequential greedy text. The Universal Transformer's cached decoding (one cache per ACT step) equal
to its full forward while positions halt at different steps."""

import pytest
import torch

from tests.models.helpers import build, greedy_by_full_forwards
from undertow.models.depth.config import DepthConfig
from undertow.models.depth.generate import generate, prefill, step
from undertow.models.depth.sampler import diagonal_generate

V = 37


@pytest.fixture(scope="module")
def model():
    cfg = DepthConfig(arch="huginn", vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, n_prelude=1,
                      n_core=2, n_coda=1, mean_depth=3.0, max_depth=4, backprop_depth=2)
    return build(cfg, perturb=0.05).eval()


def at_depth(model, depth, fn):
    model.set_depth(depth)
    try:
        return fn()
    finally:
        model.set_depth(None)


def test_cached_steps_give_the_full_forwards_logits_beyond_the_training_depth(model):
    ids = torch.randint(0, V, (2, 7))
    full = at_depth(model, 6, lambda: model(ids).detach())  # 6 > max_depth 4: test-time depth
    with torch.no_grad():
        logits, state = prefill(model, ids[:, :4], 6, "dense")
        assert torch.allclose(logits, full[:, 3], atol=1e-5)
        for t in range(4, 7):
            assert torch.allclose(step(model, ids[:, t], t, state, 6, "dense", 0.0), full[:, t], atol=1e-5)
    assert state.steps_taken == [6.0, 6.0, 6.0]


def test_generate_equals_greedy_full_forwards_and_exits_early_when_asked(model):
    ids = torch.randint(0, V, (2, 5))
    want = at_depth(model, 5, lambda: greedy_by_full_forwards(model, ids, 6))
    assert torch.equal(generate(model, ids, 6, depth=5), want)
    for cache in ("dense", "shared"):
        stats = {}
        out = generate(model, ids, 6, depth=5, cache=cache, exit_threshold=1e9, stats=stats)
        assert out.shape == (2, 11) and stats["steps_per_token"] == [1.0] * 5  # every token exits after 1 step
    stats = {}  # by the next-token distribution: KL needs two steps to compare
    generate(model, ids, 6, depth=5, exit_on="kl", exit_threshold=1e9, stats=stats)
    assert stats["steps_per_token"] == [2.0] * 5
    stats = {}
    shared = generate(model, ids, 6, depth=5, cache="shared", stats=stats)
    assert stats["steps_per_token"] == [5.0] * 5 and shared.shape == (2, 11)
    with pytest.raises(ValueError, match="cache = 'wide' is unknown"):
        generate(model, ids, 2, cache="wide")


def test_shared_cache_holds_one_entry_per_position_whatever_the_depth(model):
    ids = torch.randint(0, V, (1, 4))
    with torch.no_grad():
        _, dense = prefill(model, ids, 5, "dense")
        _, shared = prefill(model, ids, 5, "shared")
        step(model, ids[:, -1], 4, shared, 5, "shared", 0.0)
    assert len(dense.core) == 5 and len(shared.core) == 1
    assert shared.core[0][0].k.shape[1] == 5


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_diagonal_sampler_returns_the_sequential_greedy_text(model, depth):
    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(depth))
    want = at_depth(model, depth, lambda: greedy_by_full_forwards(model, ids, 8))
    stats = {}
    assert torch.equal(diagonal_generate(model, ids, 8, depth=depth, stats=stats), want)
    assert stats["passes"] <= depth * 8 + 8  # never more than the sequential sampler's r per token (+ restarts)


def test_model_generate_for_both_architectures(model):
    ids = torch.randint(0, V, (2, 4))
    want = at_depth(model, 3, lambda: greedy_by_full_forwards(model, ids, 5))
    assert torch.equal(model.generate(ids, 5, depth=3), want)
    ut = build(DepthConfig(arch="ut", vocab_size=V, d_model=32, n_heads=4, ffn_hidden=48, max_steps=3), perturb=0.05)
    assert torch.equal(ut.generate(ids, 5), greedy_by_full_forwards(ut.eval(), ids, 5))


def test_ut_cached_decoding_gives_the_full_forwards_logits_while_positions_halt_at_different_steps():
    from undertow.models.common.aux import collect_aux
    from undertow.models.depth import ut_generate

    cfg = DepthConfig(arch="ut", vocab_size=V, d_model=32, n_heads=4, ffn_hidden=48, max_steps=5, act_eps=0.01)
    ut = build(cfg, perturb=0.05).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a halting unit that makes positions halt after different numbers of steps
        ut.layers[0].halt.bias.fill_(-1.0)
        ut.layers[0].halt.weight.normal_(0.0, 1.0)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    with collect_aux(loss_scale=1.0) as aux:  # (metrics are recorded where gradients are taken)
        full = ut(ids).detach()
    steps = aux.means()["act/steps"]  # mean steps over the positions: not a whole number, so they differ
    assert 1.0 < steps < 5.0 and steps != round(steps)
    seen = []

    def record(prefill, step, input_ids, n, greedy):  # drive the cached prefill/step with the given tokens
        logits, caches = prefill(ids[:, :4])
        seen.append(logits)
        for t in range(4, 9):
            seen.append(step(ids[:, t], t, caches))
        return ids

    original = ut_generate.generate_tokens
    ut_generate.generate_tokens = record
    try:
        ut_generate.generate(ut, ids[:, :4], 5)
    finally:
        ut_generate.generate_tokens = original
    torch.testing.assert_close(torch.stack(seen, 1), full[:, 3:], atol=1e-5, rtol=1e-5)
    assert torch.equal(ut.generate(ids[:, :4], 6), greedy_by_full_forwards(ut, ids[:, :4], 6))
    with pytest.raises(ValueError, match="takes no options"):
        ut.generate(ids, 2, depth=3)
