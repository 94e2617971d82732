"""The ParaRNN family: config refusals, meta build and init, forward and gradients, the Newton
residual as a metric, documents, decoding, hybrids, the spec's numbers and the recipes' plans."""

import pytest
import torch

from tests.models.helpers import build, greedy_by_full_forwards
from undertow.configtools import ConfigError
from undertow.models import registry
from undertow.models.common.aux import collect_aux
from undertow.models.pararnn.config import ParaRNNConfig
from undertow.models.pararnn.generate import prefill, step
from undertow.models.pararnn.spec import flops_per_token, layer_matmul_params, newton_flops, state_elements
from undertow.pretrain.config import build_config

V = 61


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_cfg(**kw):
    base = dict(vocab_size=V, d_model=32, layer_pattern="g-l-", heads=2, chunk_size=4, multiple_of=16)
    return ParaRNNConfig(**{**base, **kw})


@pytest.mark.parametrize("changes, field, says", [
    (dict(iterations=0), "model.iterations", "must be >= 1"),
    (dict(tol=0.0), "model.tol", "must be > 0, or none"),
    (dict(tol=-1e-3), "model.tol", "must be > 0, or none"),
    (dict(heads=3), "model.heads", "d_inner = expand * d_model = 32; valid: [1, 2, 4, 8, 16, 32]"),
    (dict(layer_pattern="gx"), "model.layer_pattern", "(found ['x'])"),
    (dict(conv_width=5), "model.conv_width", "must be 2, 3 or 4"),
    (dict(layer_pattern="g*", attn_heads=3), "model.attn_heads", "valid: [1, 2, 4, 8, 16]"),
])
def test_bad_configs_are_refused_naming_field_value_and_what_is_valid(changes, field, says):
    with pytest.raises(ConfigError, match=field) as error:
        build_config({"name": "t", "model": {"family": "pararnn", "vocab_size": V, "d_model": 32, **changes}})
    assert says in str(error.value)
    with pytest.raises(ConfigError, match=field):  # and the model refuses to be built from it
        registry.build_model(ParaRNNConfig(vocab_size=V, d_model=32, **changes))


def test_tol_none_from_toml_and_cli_spelling():
    cfg = build_config({"name": "t", "model": {"family": "pararnn", "vocab_size": V, "tol": "none"}}).model
    assert cfg.tol is None
    assert build_config({"name": "t", "model": {"family": "pararnn", "vocab_size": V, "tol": 1e-6}}).model.tol == 1e-6


def test_tp_that_does_not_divide_the_channel_groups_is_refused_unless_the_projection_is_dense():
    from undertow.parallel.mesh import LayoutError, ParallelDims

    cfg = tiny_cfg(heads=2)
    limits = registry.get("pararnn").shape_limits(cfg)
    ParallelDims(tp=2).validate(2, limits)
    with pytest.raises(LayoutError, match="heads") as error:
        ParallelDims(tp=4).validate(4, limits)
    assert "valid tp: 1, 2" in str(error.value) and "or heads = 1" in str(error.value)
    dense = registry.get("pararnn").shape_limits(tiny_cfg(heads=1, d_model=24))  # B split by output channel
    ParallelDims(tp=8).validate(8, dense)
    with pytest.raises(LayoutError, match="d_inner") as error:  # but whole channels
        ParallelDims(tp=16).validate(16, dense)
    assert "valid tp: 1, 2, 3, 4, 6, 8, 12, 24" in str(error.value)


def test_meta_build_parameter_shapes_and_init():
    cfg = tiny_cfg(d_model=64, heads=4)
    model = build(cfg)
    params = dict(model.named_parameters())
    gru, lstm = "layers.0.mixer.", "layers.2.mixer."
    assert params[gru + "cell_weight"].shape == (4, 3, 16, 16)  # (heads, gates, out, in): block-diagonal
    assert params[gru + "a"].shape == (3, 64) and gru + "p" not in params
    assert params[lstm + "p"].shape == (2, 64)
    assert params[gru + "conv_weight"].shape == (64, 4)
    assert model.lm_head.weight is model.embed.weight  # tied by default
    per_cell = 3 * 64 * 64 + 3 * 64 * 16 + 64 * 4 + 64 + 3 * 64 + 3 * 64 + 64 + 64  # + norm weights
    assert sum(p.numel() for p in model.parameters()) == (
        V * 64 + 64 + 2 * per_cell + 2 * 64 + 2 * (3 * 64 * cfg.hidden + 64))  # + the LSTM's peepholes
    for name in (gru + "a", lstm + "a", lstm + "p"):
        w = params[name]
        assert w.abs().max() <= 0.9 and w.std().item() == pytest.approx(1 / 8, rel=0.25)
    assert not params[gru + "cell_bias"].any()
    assert params[gru + "cell_weight"].std().item() == pytest.approx(0.25, rel=0.1)  # 1 / sqrt(Dh)


@pytest.mark.parametrize("pattern", ["g-", "l-", "g*l-"])
def test_forward_and_every_gradient_with_the_residual_recorded(pattern):
    model = build(tiny_cfg(layer_pattern=pattern), perturb=0.05)
    ids = torch.randint(0, V, (2, 23))  # not a multiple of the chunk
    with collect_aux() as aux:
        logits = model(ids)
        logits.logsumexp(-1).mean().backward()
    assert logits.shape == (2, 23, V) and torch.isfinite(logits).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    residual = aux.means()["pararnn/residual"]
    assert 0 <= residual < 1e-5  # 3 Newton steps converge at the initialization


def test_three_newton_iterations_converge_on_the_tiny_recipes_shapes():
    """The tiny recipes' cell (d 128, 4 heads, T 128) at initialization: the default 3 iterations
    leave a residual near float32 rounding, and the logits equal an exact solve's (T iterations)."""
    from undertow.pretrain.config import load_config

    for recipe in ("tiny-paragru", "tiny-paralstm"):
        cfg = load_config(recipe).model
        cfg.vocab_size = V
        model = build(cfg)
        ids = torch.randint(0, V, (2, 128))
        with collect_aux() as aux:
            logits = model(ids)
        assert aux.means()["pararnn/residual"] < 1e-5, recipe
        cfg.iterations = 128  # Newton is exact after T steps
        with torch.no_grad():
            assert rel_err(logits, model(ids)) < 1e-5, recipe


def test_an_unconverged_solve_is_logged_and_warned_not_silent():
    """One Newton step on strong recurrences: the recorded residual is large and the kernel warns."""
    from undertow.kernels.pararnn import NewtonNotConvergedWarning

    model = build(tiny_cfg(layer_pattern="l", iterations=1), perturb=0.05)
    with torch.no_grad():
        model.layers[0].mixer.a.mul_(40.0)
    with collect_aux() as aux, pytest.warns(NewtonNotConvergedWarning):
        model(torch.randint(0, V, (2, 24)))
    assert aux.means()["pararnn/residual"] > 1e-3


def test_bfloat16_autocast_stays_close_to_float32():
    model = build(tiny_cfg(layer_pattern="g*l-"), perturb=0.05)
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids)
    assert torch.isfinite(low).all() and rel_err(low.float(), ref) < 3e-2


@pytest.mark.parametrize("pattern", ["g-l-", "l*g"])
def test_packed_documents_equal_each_document_alone(pattern):
    """A row of two documents gives each the logits it has alone, by doc_ids or cu_seqlens; without
    boundaries the second document sees the first."""
    model = build(tiny_cfg(layer_pattern=pattern), perturb=0.05)
    a, b = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 7))  # the boundary inside a chunk of 4
    row = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 6 + [1] * 7], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([model(a), model(b)], dim=1)
        by_ids = model(row, doc_ids=doc_ids)
        by_cu = model(row, cu_seqlens=torch.tensor([0, 6, 13], dtype=torch.int32))
        joined = model(row)
    assert rel_err(by_ids, alone) <= 1e-5 and rel_err(by_cu, alone) <= 1e-5
    assert rel_err(joined[:, 6:], alone[:, 6:]) > 1e-3


@pytest.mark.parametrize("pattern", ["g-l-", "g*l-"])
def test_step_by_step_logits_match_the_full_forward(pattern):
    model = build(tiny_cfg(layer_pattern=pattern), perturb=0.05)
    ids = torch.randint(0, V, (2, 13))
    full = model(ids)
    prompt = 5  # not a multiple of the chunk
    with torch.no_grad():
        logits, states = prefill(model, ids[:, :prompt])
        assert rel_err(logits, full[:, prompt - 1]) <= 1e-5
        for t in range(prompt, ids.shape[1]):
            logits = step(model, ids[:, t], t, states)
            assert rel_err(logits, full[:, t]) <= 1e-5, t


def test_greedy_generation_equals_argmax_of_repeated_full_forwards_and_sampling_is_seeded():
    model = build(tiny_cfg(layer_pattern="l*g-"), perturb=0.05)
    prompt = torch.randint(0, V, (2, 5))
    assert torch.equal(model.generate(prompt, max_new_tokens=6), greedy_by_full_forwards(model, prompt, 6))
    torch.manual_seed(5)
    a = model.generate(prompt, 4, greedy=False)
    torch.manual_seed(5)
    assert torch.equal(a, model.generate(prompt, 4, greedy=False))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


def test_first_training_steps_lower_the_loss_and_stay_finite():
    torch.manual_seed(0)
    model = build(tiny_cfg())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    text = torch.randint(0, V, (64,))
    ids = torch.stack([text.roll(-s) for s in range(0, 32, 8)])[:, :33]  # a repeated text to learn
    losses = []
    for _ in range(10):
        with collect_aux() as aux:
            loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, V), ids[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
        assert torch.isfinite(loss) and aux.means()["pararnn/residual"] < 1e-4
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_spec_counts_the_newton_iterations():
    cfg = tiny_cfg(layer_pattern="g")
    d, D, K = 32, 32, 4
    assert layer_matmul_params(cfg, "g") == 3 * d * D + 3 * D * 16
    one = flops_per_token(cfg, 64)
    assert one == 3 * (2 * layer_matmul_params(cfg, "g") + D * (2 * K + newton_flops("gru", 3))) + 6 * d * V
    cost = registry.get("pararnn").layer_cost
    more = tiny_cfg(layer_pattern="g", iterations=6)
    assert cost(more, 64)[0] - cost(cfg, 64)[0] == 3 * D * (newton_flops("gru", 6) - newton_flops("gru", 3)) > 0
    assert state_elements(tiny_cfg(layer_pattern="g*l-")) == [D * 4, 0, D * 5, 0]


@pytest.mark.parametrize("recipe", ["tiny-paragru", "tiny-paralstm"])
def test_tiny_recipes_plan_through_the_registry(recipe):
    from undertow.planning.summary import make_plan
    from undertow.pretrain.config import load_config

    cfg = load_config(recipe)
    plan = make_plan(recipe)
    assert plan.family == "pararnn" and plan.layers == cfg.model.n_layers


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_7b_recipes_build_on_meta_with_the_dclm_7b_backbone(cell, capsys):
    """DCLM-7B's shape (d 4096, 32 layers of a mixer and a SwiGLU of 11008, vocab 50432, untied) with
    the cell in attention's place: 6.76B parameters (recipe comment)."""
    from undertow.cli import main
    from undertow.pretrain.config import load_config

    cfg = load_config(f"pararnn-7b-{cell}").model
    with torch.device("meta"):
        model = registry.build_model(cfg)
    d, hidden, vocab = 4096, 11008, 50432
    cell_block = 3 * d * d + 3 * d * 1024 + d * 4 + d + 3 * d + 3 * d + (2 * d if cell == "lstm" else 0) + d + d
    mlp_block = 3 * d * hidden + d
    assert sum(p.numel() for p in model.parameters()) == 32 * (cell_block + mlp_block) + 2 * vocab * d + d
    assert main(["plan", f"pararnn-7b-{cell}"]) == 0
    assert f"pararnn-7b-{cell}" in capsys.readouterr().out


def test_7b_recipe_finds_a_layout_on_8_gpus(capsys):
    """The planner's meta-device profile runs the Newton solver too (no residual read on meta)."""
    from undertow.cli import main

    assert main(["plan", "pararnn-7b-lstm", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "layouts that fit" in out and "8 GPUs x 80 GiB" in out
