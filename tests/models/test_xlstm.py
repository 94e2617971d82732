"""The xLSTM family: config refusals, meta build and xLSTM-7B's init, first training steps, decoding,
documents, transformers' xLSTMBlock with mapped weights, the spec's numbers and the 7B plan."""

import math

import pytest
import torch

from undertow.configtools import ConfigError
from tests.models.helpers import build, greedy_by_full_forwards
from undertow.models import registry
from undertow.models.xlstm.config import XLSTMConfig
from undertow.models.xlstm.generate import prefill, step
from undertow.models.xlstm.mlstm_layer import soft_cap
from undertow.models.xlstm.spec import block_matmul_params, flops_per_token, state_elements
from undertow.pretrain.config import build_config

V = 61


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_cfg(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, chunk_size=4, ffn_proj_factor=1.5,
                ffn_round_up_to_multiple_of=16)
    return XLSTMConfig(**{**base, **kw})


@pytest.mark.parametrize("changes, field, says", [
    (dict(n_heads=3), "model.n_heads", "must divide qk_dim = 16 and v_dim = 32; valid: [1, 2, 4, 8, 16]"),
    (dict(qk_dim_factor=0.3), "model.qk_dim_factor", "a whole number of channels"),
    (dict(layer_pattern="mx"), "model.layer_pattern", "unknown letters ['x']"),
    (dict(layer_pattern="mmm"), "model.layer_pattern", "has 3 letters but n_layers = 2"),
    (dict(gate_soft_cap=-1.0), "model.gate_soft_cap", "must be >= 0"),
    (dict(chunk_size=0), "model.chunk_size", "must be >= 1"),
])
def test_bad_configs_are_refused_naming_field_value_and_what_is_valid(changes, field, says):
    with pytest.raises(ConfigError, match=field) as error:
        model = {"family": "xlstm", "vocab_size": V, "d_model": 32, "n_layers": 2, **changes}
        build_config({"name": "t", "model": model})
    assert says in str(error.value)
    with pytest.raises(ConfigError, match=field):  # and the model refuses to be built from it
        registry.build_model(XLSTMConfig(vocab_size=V, d_model=32, n_layers=2, **changes))


def test_meta_build_and_the_xlstm_7b_initialization():
    cfg = tiny_cfg(d_model=64, n_layers=3, n_heads=4)
    model = build(cfg)
    params = dict(model.named_parameters())
    d, h, hidden = 64, 4, 96
    assert params["layers.0.mlstm.q.weight"].shape == (32, d)
    assert params["layers.0.mlstm.v.weight"].shape == (64, d)
    assert params["layers.0.mlstm.igate.bias"].shape == (h,)
    assert params["layers.0.ffn.gate_proj.weight"].shape == (hidden, d)
    assert params["lm_head.weight"] is not params["embed.weight"]  # untied, as xLSTM-7B
    assert sum(p.numel() for p in params.values()) == (
        2 * V * d + d + 3 * (block_matmul_params(cfg) + 2 * h + 64 + 2 * d))
    for i in range(3):
        mlstm = model.layers[i].mlstm
        assert torch.equal(mlstm.igate.bias, torch.full((h,), -10.0))
        assert torch.allclose(mlstm.fgate.bias, torch.linspace(3.0, 6.0, h))
        for gate in (mlstm.igate, mlstm.fgate, mlstm.ogate):
            assert not gate.weight.any()
    small, wang = math.sqrt(2 / (5 * d)), 2 / 3 / math.sqrt(d)
    q = torch.cat([layer.mlstm.q.weight.flatten() for layer in model.layers])
    out = torch.cat([layer.mlstm.out_proj.weight.flatten() for layer in model.layers])
    down = torch.cat([layer.ffn.down_proj.weight.flatten() for layer in model.layers])
    assert q.std().item() == pytest.approx(small, rel=0.1)
    assert model.embed.weight.std().item() == pytest.approx(small, rel=0.1)
    assert out.std().item() == pytest.approx(wang, rel=0.1)
    assert down.std().item() == pytest.approx(2 / 3 / math.sqrt(hidden), rel=0.1)


def test_forward_is_soft_capped_float32_logits():
    model = build(tiny_cfg(logit_soft_cap=2.0), perturb=0.5)
    logits = model(torch.randint(0, V, (2, 9)))
    assert logits.shape == (2, 9, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and logits.abs().max() < 2.0 and logits.abs().max() > 1.0


def test_soft_cap_function_and_gradient_are_the_three_ops():
    """The soft-cap's hand-written backward (mlstm_layer._SoftCap) against autograd through
    cap * tanh(x / cap), in float64, with values that saturate the cap and values that do not."""
    x = (torch.randn(3, 5, 7, dtype=torch.float64) * 20).requires_grad_()
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    ours = soft_cap(x, 15.0)
    (dx,) = torch.autograd.grad(ours, x, g)
    ref = 15.0 * torch.tanh(x / 15.0)
    (ref_dx,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(ours, ref) and rel_err(dx, ref_dx) < 1e-14
    assert torch.autograd.gradcheck(lambda t: soft_cap(t, 3.0), (x[0, :2].detach().clone().requires_grad_(),))
    assert soft_cap(x, 0.0) is x


def test_stacked_projections_equal_the_six_linears(monkeypatch):
    """The mLSTM layer's one stacked matmul (mlstm_layer.stacked_projections) gives each Linear's
    output and every gradient; a module with a forward hook (what some wrappers gather weights in)
    makes the layer call the Linears themselves. In float64: the two differ only by the matmuls'
    rounding, which the recurrence's exponential gates and the bias gradients' sums over tokens
    amplify (float32: igate.bias 3e-5 relative), so float64 tells a wrong stacking from rounding."""
    import copy

    from undertow.models.xlstm import mlstm_layer
    from undertow.models.xlstm.mlstm_layer import MLSTMLayer

    torch.manual_seed(0)
    layer = MLSTMLayer(tiny_cfg()).double()
    for p in layer.parameters():  # non-zero gates and biases: every term is exercised
        torch.nn.init.normal_(p, std=0.3)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    real = mlstm_layer.stacked_projections
    used = []
    monkeypatch.setattr(mlstm_layer, "stacked_projections", lambda x, mods: used.append(1) or real(x, mods))
    stacked = layer(x)
    assert used, "the stacked matmul did not run"
    stacked.square().sum().backward()
    with monkeypatch.context() as m:
        m.setattr(mlstm_layer, "stacked_projections", lambda x, mods: None)
        separate = twin(x)
    separate.square().sum().backward()
    assert rel_err(stacked, separate) < 1e-12
    for (name, p), q in zip(layer.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-10, name
    monkeypatch.setattr(mlstm_layer, "stacked_projections", real)
    seen = []
    layer.k.register_forward_hook(lambda mod, args, out: seen.append(mod))
    layer(x)
    assert seen == [layer.k]
    assert mlstm_layer.stacked_projections(x, (layer.q, layer.k)) is None


def test_first_training_steps_lower_the_loss_and_stay_finite():
    """xLSTM-7B's init (input gates at -10, forget gates at 3..6) with AdamW at a high learning rate:
    the loss falls over the first steps and no gradient is ever NaN or huge."""
    torch.manual_seed(0)
    model = build(tiny_cfg(n_layers=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    text = torch.randint(0, V, (64,))
    ids = torch.stack([text.roll(-s) for s in range(0, 32, 8)])[:, :33]  # a repeated text to learn
    losses = []
    for _ in range(12):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        assert torch.isfinite(loss) and torch.isfinite(norm) and norm < 100, (loss, norm)
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), rel=0.05)  # small init: near-uniform predictions
    assert losses[-1] < losses[0] - 0.5, losses


def test_step_by_step_logits_match_the_full_forward():
    model = build(tiny_cfg(), perturb=0.3)
    ids = torch.randint(0, V, (2, 13))
    full = model(ids)
    prompt = 5  # not a multiple of the chunk: the prefill's state comes from a partial chunk
    with torch.no_grad():
        logits, states = prefill(model, ids[:, :prompt])
        assert rel_err(logits, full[:, prompt - 1]) <= 1e-5
        for t in range(prompt, ids.shape[1]):
            logits = step(model, ids[:, t], t, states)
            assert rel_err(logits, full[:, t]) <= 1e-5, t


def test_greedy_generation_equals_argmax_of_repeated_full_forwards_and_sampling_is_seeded():
    model = build(tiny_cfg(), perturb=0.3)
    prompt = torch.randint(0, V, (2, 5))
    generated = model.generate(prompt, max_new_tokens=6)
    assert torch.equal(generated, greedy_by_full_forwards(model, prompt, 6))
    torch.manual_seed(5)
    a = model.generate(prompt, 4, greedy=False)
    torch.manual_seed(5)
    assert torch.equal(a, model.generate(prompt, 4, greedy=False))
    assert torch.equal(model.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


def test_documents_reset_the_state():
    """A row of two documents gives each document the logits it has alone, by doc_ids or cu_seqlens;
    without boundaries the second document sees the first."""
    model = build(tiny_cfg(), perturb=0.3)
    a, b = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 7))
    row = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 6 + [1] * 7], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([model(a), model(b)], dim=1)
        by_ids = model(row, doc_ids=doc_ids)
        by_cu = model(row, cu_seqlens=torch.tensor([0, 6, 13], dtype=torch.int32))
        joined = model(row)
    assert rel_err(by_ids, alone) <= 1e-5 and rel_err(by_cu, alone) <= 1e-5
    assert rel_err(joined[:, 6:], alone[:, 6:]) > 1e-3


def test_block_equals_transformers_xlstm_block_with_mapped_weights():
    transformers = pytest.importorskip("transformers")
    from transformers.models.xlstm import modeling_xlstm

    from undertow.models.xlstm.hf import hf_config, to_hf

    cfg = tiny_cfg(d_model=128, n_layers=1, n_heads=2, ffn_proj_factor=1.0, ffn_round_up_to_multiple_of=64)
    ours = build(cfg, perturb=0.1)
    config, tensors = to_hf(cfg, ours.state_dict(), {})
    theirs = modeling_xlstm.xLSTMBlock(transformers.xLSTMConfig(**{
        k: v for k, v in hf_config(cfg, {}).items() if k not in ("architectures", "model_type")}))
    prefix = "backbone.blocks.0."
    theirs.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    x = torch.randn(2, 11, 128)
    with torch.no_grad():
        want, _ = theirs.eval()(x)
        got = ours.layers[0](x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_spec_numbers():
    cfg = tiny_cfg()
    dqk, dv, h = 8, 16, 2
    block = 2 * block_matmul_params(cfg) + 4 * h * dqk * dv + h * 4 * (dqk + dv)
    assert flops_per_token(cfg, 64) == 3 * (2 * block) + 6 * 32 * V
    assert state_elements(cfg) == [h * (dqk * dv + dqk + 1)] * 2
    assert registry.get("xlstm").shape_limits(cfg) == [("tp", "n_heads", 2), ("tp", "ffn_hidden", 48)]


def test_xlstm_7b_recipe_counts_the_published_parameters_and_plans_on_8_gpus(capsys):
    """6,865,424,896 parameters: transformers' xLSTMConfig() defaults (xLSTM-7B, arXiv 2503.13427),
    built on the meta device."""
    from undertow.cli import main
    from undertow.planning.summary import make_plan
    from undertow.pretrain.config import load_config

    cfg = load_config("xlstm-7b").model
    with torch.device("meta"):
        model = registry.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 6_865_424_896
    assert (cfg.qk_head_dim, cfg.v_head_dim, cfg.hidden) == (256, 512, 10944)
    assert make_plan("xlstm-7b").parameters == 6_865_424_896
    assert main(["plan", "xlstm-7b", "--gpus", "8"]) == 0
    assert "xlstm-7b" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["tiny-xlstm", "xlstm-125m"])
def test_small_recipes_plan_through_the_registry(recipe):
    from undertow.planning.summary import make_plan
    from undertow.pretrain.config import load_config

    cfg = load_config(recipe)
    plan = make_plan(recipe)
    assert plan.family == "xlstm" and plan.layers == cfg.model.n_layers


def test_a_qk_head_wider_than_the_kernels_tile_is_refused_at_load():
    from undertow.configtools import ConfigError
    from undertow.pretrain.config import load_config

    with pytest.raises(ConfigError, match=r"model.n_heads = 1 .* q/k head width of 512, above .* 256; valid n_heads: \[2, 4"):
        load_config("tiny-xlstm", ["--model.d_model", "1024", "--model.n_heads", "1"])
