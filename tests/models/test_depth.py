"""The recurrent-depth family: config refusals, the Universal Transformer's ACT (halting, remainder,
weights, ponder loss), Huginn's core (depth draws, truncated backprop, shared weights, test-time
depth, reproducible eval), the spec's numbers, the recipes and the 3.5B count."""

import math

import pytest
import torch

from tests.models.helpers import build
from undertow.configtools import ConfigError
from undertow.models import registry
from undertow.models.common.aux import collect_aux
from undertow.models.depth.config import DepthConfig
from undertow.models.depth.depth import draw_depth
from undertow.models.depth.spec import (block_forward_flops, expected_steps, flops_per_token, layer_cost,
                                       step_flops_per_token)
from undertow.pretrain.config import build_config

V = 37


def ut_cfg(**kw):
    return DepthConfig(**{**dict(arch="ut", vocab_size=V, d_model=32, n_heads=4, ffn_hidden=48, max_steps=4), **kw})


def huginn_cfg(**kw):
    base = dict(arch="huginn", vocab_size=V, d_model=32, n_heads=4, ffn_hidden=48, n_prelude=1, n_core=2,
                n_coda=1, mean_depth=4.0, max_depth=12, backprop_depth=2)
    return DepthConfig(**{**base, **kw})


@pytest.mark.parametrize("changes, field, says", [
    (dict(arch="ut", act_eps=0.0), "model.act_eps", r"0.0 is invalid: must lie in \(0, 1\)"),
    (dict(arch="ut", act_eps=1.0), "model.act_eps", r"1.0 is invalid: must lie in \(0, 1\)"),
    (dict(arch="ut", max_steps=0), "model.max_steps", "must be >= 1"),
    (dict(mean_depth=0.5), "model.mean_depth", "r < 1"),
    (dict(eval_depth=-1), "model.eval_depth", "must be >= 1"),
    (dict(max_depth=0), "model.max_depth", "r_max < 1"),
    (dict(backprop_depth=9, max_depth=8), "model.backprop_depth", r"k must lie in \[1, max_depth = 8\]"),
    (dict(mean_depth=500.0, max_depth=4, backprop_depth=2), "model.max_depth", "has no mass at or below it"),
    (dict(depth_distribution="fixed", mean_depth=9.0, max_depth=8, backprop_depth=2), "model.max_depth", "no mass"),
    (dict(n_heads=5), "model.n_heads", "must divide d_model=32"),
])
def test_bad_configs_are_refused_naming_field_value_and_what_is_valid(changes, field, says):
    model = {"family": "depth", "vocab_size": V, "d_model": 32, "n_heads": 4, **changes}
    with pytest.raises(ConfigError, match=field) as error:
        build_config({"name": "t", "model": model})
    assert len(list(__import__("re").finditer(says, str(error.value)))) == 1, str(error.value)


# ---------------------------------------------------------------- Universal Transformer + ACT
def act_run(model, ids):
    with collect_aux() as aux:
        logits = model(ids)
    return logits, aux.means()


def test_act_halting_at_once_is_one_block_step_and_ponders_two():
    model = build(ut_cfg(), perturb=0.02)
    with torch.no_grad():
        model.layers[0].halt.bias.fill_(30.0)  # p = 1: every position halts at step 1 with R = 1
    ids = torch.randint(0, V, (2, 9))
    logits, metrics = act_run(model, ids)
    loop = model.layers[0]
    ctx = model.layer_context(ids.shape, ids.device)
    ctx.pop("position_ids")
    from undertow.models.depth.blocks import step_timing_signal
    (x,) = model.embed_stage(ids, ctx)
    want = model.head_stage((loop.block(x + step_timing_signal(4, 32)[0], **ctx),))
    assert torch.allclose(logits, want, atol=1e-5)
    assert metrics["act/steps"] == 1.0 and metrics["act/ponder"] == pytest.approx(2.0)


def test_act_never_halting_runs_max_steps_like_the_plain_loop():
    cfg = ut_cfg()
    model = build(cfg, perturb=0.02)
    with torch.no_grad():
        model.layers[0].halt.bias.fill_(-30.0)  # p = 0: forced to halt at the last step, R = 1
    ids = torch.randint(0, V, (2, 9))
    logits, metrics = act_run(model, ids)
    model.layers[0].act = False
    assert torch.allclose(logits, model(ids), atol=1e-5)
    assert metrics["act/steps"] == 4.0 and metrics["act/ponder"] == pytest.approx(5.0)


def test_act_weights_sum_to_one_halted_states_freeze_and_the_ponder_loss_has_a_gradient():
    """A block replaced by x -> 2x + 1 (per position, no attention) makes the ACT sum checkable in
    closed form from the halting probabilities the loop computes."""
    torch.manual_seed(0)
    cfg = ut_cfg(ponder_tau=0.5)
    model = build(cfg, perturb=0.02)
    loop = model.layers[0]
    seen = []
    loop.block.forward = lambda s, *a, **k: seen.append(s.detach().clone()) or (2 * s + 1)
    with torch.no_grad():
        loop.halt.weight.normal_(std=0.5)
        loop.halt.bias.fill_(-0.5)
    x = torch.randn(3, 11, 32)
    ctx = model.layer_context((3, 11), x.device)
    out = loop(x, **ctx)
    # recompute the expected output position by position from the recorded step inputs
    from undertow.models.depth.blocks import step_timing_signal
    timing = step_timing_signal(4, 32)
    want = torch.zeros_like(x)
    steps_taken = torch.zeros(3, 11)
    for b in range(3):
        for t in range(11):
            h, s = 0.0, x[b, t]
            for n in range(4):
                s = s + timing[n]
                p = torch.sigmoid(loop.halt(s)).item()
                last = n == 3 or h + p > 1 - cfg.act_eps
                w = (1 - h) if last else p
                want[b, t] += w * (2 * s + 1)
                h += w
                steps_taken[b, t] += 1
                assert torch.allclose(seen[n][b, t], s, atol=1e-5)  # the loop's state for this position
                if last:
                    break
                s = 2 * s + 1
            for later in range(int(steps_taken[b, t]), 4):  # halted: the state stays frozen
                assert torch.allclose(seen[later][b, t], 2 * s + 1, atol=1e-5)
            assert h == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(out, want, atol=1e-4)
    assert 1 < steps_taken.mean() < 4  # a mix of early and late halting was exercised
    # the ponder loss alone (no gradient from the output) reaches the halting unit
    loop.halt.zero_grad()
    out = loop(x, **ctx)
    (out * 0).sum().backward()
    assert loop.halt.bias.grad is not None and loop.halt.bias.grad.abs().item() > 0


def test_ut_trains_and_documents_do_not_leak():
    model = build(ut_cfg(), perturb=0.02)
    ids = torch.randint(0, V, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids, position_ids=torch.tensor([list(range(5)) + list(range(7))]))
        alone = model(ids[:, 5:])
    assert torch.allclose(packed[:, 5:], alone, atol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, V, (4, 16))
    losses = []
    for _ in range(20):
        with collect_aux():
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


# ---------------------------------------------------------------- Huginn
def test_depth_draws_are_a_function_of_the_step_with_the_papers_mean_and_clamp():
    cfg = huginn_cfg(mean_depth=6.0, max_depth=30, backprop_depth=3)
    draws = [draw_depth(cfg, step) for step in range(3000)]
    assert draws[:50] == [draw_depth(cfg, step) for step in range(50)]  # same on every rank / resume
    depths = torch.tensor([d.no_grad + d.grad for d in draws], dtype=torch.float64)
    assert depths.min() >= 1 and depths.max() <= 30
    assert abs(depths.mean().item() - 7.0) < 0.25  # E[Poisson(lambda) + 1] = mean_depth + 1
    assert all(d.grad == min(3, d.no_grad + d.grad) for d in draws)
    assert len(set(depths.tolist())) > 5
    clamped = huginn_cfg(mean_depth=6.0, max_depth=5, backprop_depth=3)
    assert max(sum(draw_depth(clamped, s)) for s in range(200)) == 5
    assert draw_depth(huginn_cfg(depth_distribution="fixed", mean_depth=5.0), 7) == (3, 2)


def test_training_draw_is_logged_and_follows_set_training_step():
    model = build(huginn_cfg(), perturb=0.02).train()
    ids = torch.randint(0, V, (2, 8))
    seen = {}
    for step in (3, 11):
        model.set_training_step(step)
        with collect_aux() as aux:
            model(ids)
        seen[step] = aux.means()
        want = draw_depth(model.cfg, step)
        assert seen[step]["depth/r"] == want.no_grad + want.grad and seen[step]["depth/backprop"] == want.grad


def test_truncated_backprop_equals_no_grad_steps_then_grad_steps_and_shared_grads_add_up():
    cfg = huginn_cfg(backprop_depth=2)
    model = build(cfg, perturb=0.02).train()
    model.set_depth(5)
    ids = torch.randint(0, V, (2, 7))
    torch.manual_seed(3)
    model(ids).square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # by hand: 3 steps without gradient, 2 with; every core weight's gradient is the sum over the 2
    core = model.core
    ctx = model.layer_context(ids.shape, ids.device)
    torch.manual_seed(3)
    (x,) = model.embed_stage(ids, ctx)
    x = model.layers[0](x, **ctx)
    s = core.initial_state(x)
    with torch.no_grad():
        for _ in range(3):
            s = core.step(s, x, **ctx)
    for _ in range(2):
        s = core.step(s, x, **ctx)
    model.head_stage((model.layers[2](core.norm(s), **ctx),)).square().mean().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-7), name
    assert core.adapter.weight.grad.abs().sum() > 0


def test_eval_is_reproducible_and_test_time_depth_can_exceed_training():
    cfg = huginn_cfg(max_depth=6, backprop_depth=2, mean_depth=3.0)
    model = build(cfg, perturb=0.02).eval()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        a, b = model(ids), model(ids)
        assert torch.equal(a, b)  # the eval state init is a hash of (seed, position, channel)
        model.set_depth(40)  # beyond max_depth: allowed at test time
        deep = model(ids)
        model.set_depth(41)
        deeper = model(ids)
    assert not torch.allclose(a, deep)
    assert torch.isfinite(deep).all()
    # the sandwich norms keep the latent state bounded, so late steps change little
    assert (deeper - deep).abs().max() < (deep - a).abs().max()
    with pytest.raises(ValueError, match="depth = 0 must be >= 1"):
        model.set_depth(0)


def test_hashed_state_init_is_a_truncated_normal_per_position():
    from undertow.models.depth.core import hashed_truncated_normal

    std = 0.3
    full = hashed_truncated_normal(torch.arange(300), 64, seed=1, std=std)
    assert torch.equal(full[17:18], hashed_truncated_normal(torch.tensor([17]), 64, seed=1, std=std))
    assert not torch.equal(full, hashed_truncated_normal(torch.arange(300), 64, seed=2, std=std))
    assert abs(full.mean().item()) < 0.01 and full.abs().max() <= 3 * std + 1e-6
    assert abs(full.std().item() - std * 0.9866) < 0.01  # the std of N(0, 1) truncated to +-3


def test_huginn_trains_with_drawn_depths():
    model = build(huginn_cfg(), perturb=0.02).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, V, (4, 16))
    losses = []
    for step in range(12):
        model.set_training_step(step)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


# ---------------------------------------------------------------- spec, recipes, planner
def test_flops_count_the_expected_depth_and_layers_match_the_model():
    cfg = huginn_cfg(depth_distribution="fixed", mean_depth=5.0, backprop_depth=2)
    block = block_forward_flops(cfg, 64)
    core_step = 2 * block + 4 * 32 * 32
    assert layer_cost(cfg, 64) == [3 * block, (3 + 3 * 2) * core_step, 3 * block]
    assert flops_per_token(cfg, 64) == sum(layer_cost(cfg, 64)) + 6 * 32 * V
    no_grad, grad = expected_steps(huginn_cfg(mean_depth=32.0, max_depth=128, backprop_depth=8))
    assert grad == pytest.approx(8.0, abs=0.05) and no_grad + grad == pytest.approx(33.0, abs=0.6)
    ut = ut_cfg()
    assert layer_cost(ut, 64) == [3 * 4 * (block_forward_flops(ut, 64) + 2 * 32)]
    for cfg in (huginn_cfg(), ut):
        assert len(layer_cost(cfg, 64)) == len(build(cfg).layers) == cfg.n_layers
    assert registry.get("depth").shape_limits(huginn_cfg()) == [("tp", "n_heads", 4), ("tp", "n_kv_heads", 4),
                                                                ("tp", "ffn_hidden", 48)]


def test_step_flops_count_each_steps_own_draw_and_average_to_the_expected_depth():
    cfg = huginn_cfg(mean_depth=6.0, max_depth=20, backprop_depth=2)
    block = block_forward_flops(cfg, 64)
    core_step, rest = 2 * block + 4 * 32 * 32, 2 * 3 * block + 6 * 32 * V
    per_step = []
    for step in range(400):
        no_grad, grad = draw_depth(cfg, step)
        per_step.append(step_flops_per_token(cfg, 64, step))
        assert per_step[-1] == rest + (no_grad + 3 * grad) * core_step
    assert len(set(per_step)) > 3  # the draws differ, and so do the counts
    assert sum(per_step) / len(per_step) == pytest.approx(flops_per_token(cfg, 64), rel=0.05)
    ut = ut_cfg()
    assert step_flops_per_token(ut, 64, 7) == flops_per_token(ut, 64)


def test_trainer_mfu_counts_the_flops_of_each_steps_drawn_depth(tmp_path, monkeypatch):
    from undertow.pretrain import metrics, trainer
    from undertow.pretrain.config import load_config

    meter = metrics.Throughput(flops_per_token=100.0, peak_tflops=1e-12)  # peak: 1 FLOP/s
    meter.add(10, 400.0)
    meter.add(10)
    meter.start -= 1.0  # one second spans the two steps
    tps, mfu = meter.read()
    assert mfu / tps == pytest.approx((10 * 400.0 + 10 * 100.0) / 20, rel=1e-6)  # FLOPs a token spent

    added = []

    class Recording(metrics.Throughput):
        def add(self, tokens, flops_per_token=None):
            added.append(flops_per_token)
            super().add(tokens, flops_per_token)

    monkeypatch.setattr(trainer, "Throughput", Recording)
    small = {"model.d_model": 32, "model.n_heads": 2, "model.ffn_hidden": 64, "data.seq_len": 32,
             "data.embedded_vocab_size": 512, "training.micro_batch_size": 2, "training.steps": 4,
             "training.val_every": 0, "logging.every": 1, "checkpoint.every": 0, "checkpoint.resume": "none",
             "training.run_dir": str(tmp_path / "run")}
    cfg = load_config("tiny-depth", {k: str(v) for k, v in small.items()})
    trainer.Trainer(cfg).fit()
    assert added == [step_flops_per_token(cfg.model, 32, s) for s in range(4)]
    assert len({draw_depth(cfg.model, s) for s in range(4)}) > 1  # the steps drew different depths


def test_huginn_recipe_parameters_on_meta_and_plan_on_8_gpus(capsys):
    """The published architecture (anchors: adapter Linear(2d -> d), sandwich blocks with 4 norms,
    q/k biases, tied) counts 3,564,976,800; our core's own final norm adds 5,280. Issue #17's
    3,509,051,040 is this width as a plain 8-layer transformer (see the recipe's comment)."""
    from undertow.cli import main
    from undertow.pretrain.config import load_config

    cfg = load_config("huginn-3.5b").model
    with torch.device("meta"):
        model = registry.build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == 3_564_982_080
    d, f, v = 5280, 17920, 65536
    plain_8_layers = v * d + 8 * (4 * d * d + 3 * d * f + 2 * d) + d
    assert plain_8_layers == 3_509_051_040
    assert n - plain_8_layers == 2 * d * d + 8 * (2 * d + 2 * d) + d  # adapter, +2 norms, q/k biases, core norm
    assert cfg.head_dim == 96 and cfg.weight_std == pytest.approx(math.sqrt(2 / (5 * d)))
    assert main(["plan", "huginn-3.5b", "--gpus", "8"]) == 0
    assert "huginn-3.5b" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["tiny-ut", "tiny-depth"])
def test_tiny_recipes_plan_through_the_registry(recipe):
    from undertow.planning.summary import make_plan
    from undertow.pretrain.config import load_config

    cfg = load_config(recipe)
    plan = make_plan(recipe)
    assert plan.family == "depth" and plan.layers == cfg.model.n_layers
