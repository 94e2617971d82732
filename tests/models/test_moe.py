"""The MoE layer, its routers and MoE in the transformer, Mamba and xLSTM families: routing as
Mixtral (softmax, top-k, renormalised), RMoE's layerwise GRU with its state carried from layer to
layer, the aux losses' gradients and metrics, active-parameter FLOPs, the OLMoE-1B-7B recipe's
size, and bad configs refused at load."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.models.helpers import build
from undertow.configtools import ConfigError
from undertow.kernels.moe.reference import swiglu_expert
from undertow.models.common.aux import collect_aux
from undertow.models.mamba.config import MambaConfig
from undertow.models.moe.config import MoEConfig
from undertow.models.moe.layer import MoELayer
from undertow.models.transformer.config import TransformerConfig
from undertow.models.transformer.spec import matmul_params
from undertow.models.xlstm.config import XLSTMConfig
from undertow.pretrain.config import load_config
from undertow.planning.summary import make_plan

V = 53


def moe(**kw) -> MoEConfig:
    return MoEConfig(**{"n_experts": 4, "top_k": 2, "router_dim": 8, "z_loss_coef": 0.0, "aux_loss_coef": 0.0, **kw})


def tiny_transformer(**kw) -> TransformerConfig:
    return TransformerConfig(vocab_size=V, d_model=16, n_layers=3, n_heads=2, ffn_hidden=24, init_std=0.2,
                             moe=moe(**kw))


def layer_oracle(layer: MoELayer, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per token: softmax -> top-k -> renormalise -> weighted sum of those experts (+ shared)."""
    out = torch.zeros_like(x)
    probs = logits.softmax(-1)
    for n in range(x.shape[0]):
        top, idx = probs[n].topk(layer.cfg.top_k)
        for w, e in zip(top / top.sum(), idx):
            out[n] += w * swiglu_expert(x[n:n + 1], layer.w_gate[e], layer.w_up[e], layer.w_down[e])[0]
    if layer.shared_expert is not None:
        out += layer.shared_expert(x)
    return out


@pytest.mark.parametrize("shared", [0, 12])
def test_linear_layer_routes_like_mixtral(shared):
    torch.manual_seed(0)
    layer = MoELayer(16, 24, moe(shared_expert_hidden=shared, n_experts=5, top_k=3))
    layer.init_weights(0.3, 0.3)
    x = torch.randn(2, 7, 16)
    out, state = layer(x)
    assert state is None
    ref = layer_oracle(layer, x.reshape(-1, 16), layer.router.gate(x.reshape(-1, 16)))
    torch.testing.assert_close(out.reshape(-1, 16), ref, rtol=1e-5, atol=1e-6)


def test_rmoe_model_runs_one_gru_over_the_layers():
    """The whole model against a hand-written loop: h_0 = 0, per layer x' = W1_l x,
    h_l = GRU(x', h_(l-1)) with the ONE shared cell, logits_l = W2_l h_l."""
    model = build(tiny_transformer(router="rmoe"), perturb=0.05)
    ids = torch.randint(0, V, (2, 9))
    ctx = model.layer_context(ids.shape, ids.device)
    x = model.embed(ids)
    h = torch.zeros(18, 8)
    gru = model.router_gru.cell
    for layer in model.layers:
        x = x + layer.attn(layer.attn_norm(x), ctx["cos"], ctx["sin"])
        tokens = layer.mlp_norm(x).reshape(-1, 16)
        h = gru(layer.mlp.router.proj_in(tokens), h)
        x = x + layer_oracle(layer.mlp, tokens, layer.mlp.router.proj_out(h)).reshape(x.shape)
    ref = model.lm_head(model.norm(x))
    torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, torch.nn.GRUCell) for m in model.modules()) == 1


def test_router_state_crosses_a_stage_split():
    """As pipeline stages run it: the embed step gives (x, h_0 = 0), each stage runs its layers on
    the carried tuple and hands it on; split anywhere, the logits equal the full forward's."""
    model = build(tiny_transformer(router="rmoe"), perturb=0.05)
    ids = torch.randint(0, V, (2, 6))
    ctx = model.layer_context(ids.shape, ids.device)
    carried = model.embed_stage(ids, ctx)
    assert len(carried) == 2 and carried[1].shape == (2, 6, 8) and not carried[1].any()
    for stage in (model.layers[:1], model.layers[1:]):
        carried = tuple(t.clone() for t in carried)  # what the next stage receives
        for layer in stage:
            carried = model.run_layer(layer, carried, ctx)
    torch.testing.assert_close(model.head_stage(carried), model(ids))
    assert len(build(tiny_transformer(router="linear")).embed_stage(ids, ctx)) == 1


def test_aux_losses_reach_the_router_and_are_logged():
    cfg = tiny_transformer(aux_loss_coef=0.5, z_loss_coef=0.1)
    model = build(cfg, perturb=0.05)
    ids = torch.randint(0, V, (2, 8))
    with collect_aux() as step:
        model(ids).sum().mul(0.0).backward()  # the LM loss contributes nothing: only the aux losses
    grad = model.layers[0].mlp.router.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    means = step.means()
    for i in range(cfg.n_layers):
        for name in ("balance_loss", "z_loss", "load_min", "load_max", "load_entropy"):
            assert f"moe/layer{i}/{name}" in means
        assert means[f"moe/layer{i}/load_min"] <= 1.0 <= means[f"moe/layer{i}/load_max"]
        assert 0.0 < means[f"moe/layer{i}/load_entropy"] <= 1.0


def test_aux_loss_gradient_equals_explicit_loss():
    """add_aux_loss's gradient equals adding coef * (Switch balance loss) to the objective."""
    torch.manual_seed(1)
    cfg = moe(aux_loss_coef=0.3, z_loss_coef=0.2)
    layer = MoELayer(16, 24, cfg)
    layer.init_weights(0.3, 0.3)
    x = torch.randn(10, 16)
    out, _ = layer(x)
    out.sum().backward()
    got = layer.router.gate.weight.grad.clone()
    layer.zero_grad()
    logits = layer.router.gate(x).float()
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    f = F.one_hot(idx, 4).float().sum((0, 1)) / idx.numel()
    balance = 4 * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    cfg.aux_loss_coef = cfg.z_loss_coef = 0.0
    out, _ = layer(x)
    (out.sum() + 0.3 * balance + 0.2 * z).backward()
    torch.testing.assert_close(got, layer.router.gate.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["mamba", "xlstm"])
def test_E_letter_in_patterns(family):
    """`E` layers take the router state through other layers; every parameter gets a gradient."""
    if family == "mamba":
        cfg = MambaConfig(vocab_size=V, d_model=16, d_state=4, layer_pattern="mE*E", n_heads=2, multiple_of=8,
                          moe=moe(router="rmoe"))
    else:
        cfg = XLSTMConfig(vocab_size=V, d_model=16, n_layers=4, n_heads=2, layer_pattern="mE-E", chunk_size=4,
                          moe=moe(router="rmoe"))
    model = build(cfg, perturb=0.05)
    ids = torch.randint(0, V, (2, 8))
    carried = model.embed_stage(ids, model.layer_context(ids.shape, ids.device))
    assert len(carried) == 2 and carried[1].shape == (2, 8, 8)
    model(ids).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_flops_count_active_parameters():
    dense = TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24)
    sparse = TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24,
                               moe=MoEConfig(n_experts=8, top_k=1))
    # one expert of the dense width per token + a 16 x 8 router: the dense count plus the router
    assert matmul_params(sparse) == matmul_params(dense) + 2 * 16 * 8


def test_olmoe_recipe_size_within_one_percent():
    """OLMoE-1B-7B: transformers' OlmoeConfig(intermediate_size=1024) on the meta device has
    6,919,161,856 parameters, 1,282,017,280 active (our blocks have no q/k norms: 65,536 fewer)."""
    plan = make_plan("olmoe-1b-7b")
    assert abs(plan.parameters / 6_919_161_856 - 1) < 0.01
    assert abs(plan.active_parameters / 1_282_017_280 - 1) < 0.01
    assert 6_919_161_856 - plan.parameters == 16 * 2 * 2048
    rmoe = make_plan("olmoe-1b-7b-rmoe")
    extra = 16 * (2048 * 256 + 256 * 64 - 2048 * 64) + 3 * (2 * 256 * 256 + 2 * 256)
    assert rmoe.parameters - plan.parameters == extra
    assert "active parameters per token" in rmoe.table()


@pytest.mark.parametrize("field, value, valid", [
    ("top_k", "9", r"must be in \[1, n_experts = 8\]"),  # tiny-rmoe has 8 experts
    ("router_dim", "0", "must be >= 1"),
    ("n_experts", "-1", "must be >= 0"),
])
def test_bad_moe_configs_refused_at_load(field, value, valid):
    """The error names the field, the value and the valid range, before any work."""
    with pytest.raises(ConfigError, match=rf"model.moe.{field} = {value} is invalid: {valid}"):
        load_config("tiny-rmoe", [f"--model.moe.{field}", value])


def test_E_layers_need_experts():
    with pytest.raises(ConfigError, match=r"model.moe.n_experts = 0 is invalid: must be >= 1"):
        MambaConfig(vocab_size=V, layer_pattern="mE").validate()
    with pytest.raises(ConfigError, match=r"model.moe.top_k = 3 is invalid: must be in \[1, n_experts = 2\]"):
        XLSTMConfig(vocab_size=V, n_layers=2, layer_pattern="mE", moe=MoEConfig(n_experts=2, top_k=3)).validate()


def test_router_dim_default_is_the_papers():
    assert MoEConfig().router_dim == 256 and math.isclose(MoEConfig().aux_loss_coef, 0.01)


@pytest.mark.parametrize("family", ["mamba", "xlstm"])
def test_generation_through_E_layers_equals_full_forwards(family):
    from tests.models.helpers import greedy_by_full_forwards

    if family == "mamba":
        cfg = MambaConfig(vocab_size=V, d_model=16, d_state=4, layer_pattern="ME*E", n_heads=2, headdim=8,
                          chunk_size=4, multiple_of=8, moe=moe(router="rmoe"))
    else:
        cfg = XLSTMConfig(vocab_size=V, d_model=16, n_layers=3, n_heads=2, layer_pattern="mE*", chunk_size=4,
                          moe=moe(router="rmoe"))
    model = build(cfg, perturb=0.05).eval()
    prompt = torch.randint(0, V, (2, 5))
    assert torch.equal(model.generate(prompt, 4), greedy_by_full_forwards(model, prompt, 4))


def test_meta_profile_runs_through_moe_layers():
    """The planner measures activations on the meta device, where routing has no values: the grouped
    path splits the pairs evenly there (kernels/moe/grouped.py group_sizes)."""
    from undertow.models.profile import profile_model
    from undertow.models.transformer.model import TransformerLM

    profile = profile_model(TransformerLM, tiny_transformer(router="rmoe"), torch.float32, 16)
    assert len(profile.blocks) == 3


@pytest.mark.parametrize("first_call", ["train", "eval"])
def test_the_grouped_gemm_probe_runs_inside_activation_checkpointing_and_eval(first_call):
    """The first MoE forward probes torch._grouped_mm (cached): inside a checkpointed block it must not
    leave saved tensors the recompute will not make again, and under no_grad it must not cache 'no'."""
    import copy

    from undertow.kernels.moe.grouped import grouped_mm_runs
    from undertow.parallel.wrap import apply_activation_checkpointing

    cfg = TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24, init_std=0.2,
                            moe=moe(expert_hidden=16))
    model = build(cfg, perturb=0.05)
    plain = copy.deepcopy(model)
    ids = torch.randint(0, V, (2, 12))
    grouped_mm_runs.cache_clear()
    if first_call == "eval":
        with torch.no_grad():
            model(ids)
    apply_activation_checkpointing(model)
    model(ids).float().logsumexp(-1).mean().backward()
    plain(ids).float().logsumexp(-1).mean().backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert grouped_mm_runs("cpu", torch.float32) == hasattr(torch, "_grouped_mm")
