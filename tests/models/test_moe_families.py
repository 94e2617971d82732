"""MoE in the MLP slot of the later families: ParaRNN's `E` letter, every Titans block's FFN and the
depth family's blocks (Huginn's prelude, looped core and coda; the Universal Transformer's shared
block). Each builds on the meta device, trains with its loss falling and every MoE layer's router
metrics recorded, decodes exactly as full forwards, counts active parameters in its FLOPs and the
planner, and refuses what it cannot do at config load (the depth family's rmoe router) or at export
(the remote-code models have no MoE layers)."""

import pytest
import torch

from tests.models.helpers import build, greedy_by_full_forwards
from undertow.configtools import ConfigError
from undertow.models import registry
from undertow.models.common.aux import collect_aux
from undertow.models.common.loss import lm_loss_sum
from undertow.models.depth.config import DepthConfig
from undertow.models.depth.spec import block_forward_flops as depth_block_flops
from undertow.models.hf_common import HFConversionError
from undertow.models.moe.config import MoEConfig
from undertow.models.pararnn.config import ParaRNNConfig
from undertow.models.pararnn.spec import layer_forward_flops as pararnn_layer_flops
from undertow.models.titans.config import TitansConfig
from undertow.models.titans.spec import block_forward_flops as titans_block_flops
from undertow.planning.summary import make_plan
from undertow.pretrain.config import load_config

V, D = 53, 16


def moe(**kw) -> MoEConfig:
    return MoEConfig(**{"n_experts": 4, "top_k": 2, "router_dim": 8, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
                        **kw})


def config(family: str, router: str = "linear", **moe_kw):
    """Tiny models with MoE layers, and the indices their MoE layers' metrics are named by."""
    m = moe(router=router, **moe_kw)
    if family == "pararnn":
        return ParaRNNConfig(vocab_size=V, d_model=D, layer_pattern="gE*E", heads=2, attn_heads=2, ffn_hidden=24,
                             chunk_size=4, moe=m), [1, 3]
    if family.startswith("titans"):
        return TitansConfig(vocab_size=V, d_model=D, n_layers=2, variant=family.split("-")[1], n_heads=2, mem_heads=2,
                            chunk_size=2, segment_len=4, window=3, persistent_tokens=2, ffn_hidden=24, moe=m), [0, 1]
    if family == "depth-ut":
        return DepthConfig(arch="ut", vocab_size=V, d_model=D, n_heads=2, ffn_hidden=24, max_steps=3, moe=m), [0]
    huginn = DepthConfig(arch="huginn", vocab_size=V, d_model=D, n_heads=2, ffn_hidden=24, n_prelude=1, n_core=1,
                         n_coda=1, depth_distribution="fixed", mean_depth=2, max_depth=4, backprop_depth=2, moe=m)
    return huginn, [0, 1, 2]


CASES = [("pararnn", "linear"), ("pararnn", "rmoe"), ("titans-mac", "rmoe"), ("titans-mag", "linear"),
         ("titans-mal", "rmoe"), ("depth-ut", "linear"), ("depth-huginn", "linear")]
IDS = [f"{f}-{r}" for f, r in CASES]


@pytest.mark.parametrize("family, router", CASES, ids=IDS)
def test_trains_with_router_losses_and_metrics(family, router):
    cfg, moe_layers = config(family, router)
    model = build(cfg, perturb=0.02)
    if hasattr(model, "set_training_step"):
        model.set_training_step(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(6):
        with collect_aux() as aux:
            loss = lm_loss_sum(model(ids[:, :-1]), ids[:, 1:]) / ids[:, 1:].numel()
            loss.backward()
        if step == 0:  # the router losses reach every router; nothing is left without a gradient
            assert [n for n, p in model.named_parameters() if p.grad is None] == []
            means = aux.means()
            for i in moe_layers:
                for name in ("balance_loss", "z_loss", "load_min", "load_max", "load_entropy"):
                    assert f"moe/layer{i}/{name}" in means, (i, name, sorted(means))
            assert not any(k.startswith("moe/") and int(k.split("/")[1][5:]) not in moe_layers for k in means)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert sum(m.routed_total is not None for m in model.modules() if hasattr(m, "routed_total")) == len(moe_layers)


@pytest.mark.parametrize("family, router", CASES, ids=IDS)
def test_decoding_equals_full_forwards(family, router):
    cfg, _ = config(family, router)
    model = build(cfg, perturb=0.05).eval()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.generate(prompt, 5), greedy_by_full_forwards(model, prompt, 5))


@pytest.mark.parametrize("family", ["pararnn", "titans-mac"])
def test_rmoe_state_is_carried_and_crosses_a_stage_split(family):
    """The embed step gives (x, h_0 = 0 (B, T, router_dim)); split anywhere, as pipeline stages run it,
    the logits equal the full forward's; one GRU cell serves every MoE layer."""
    cfg, _ = config(family, "rmoe")
    model = build(cfg, perturb=0.05)
    ids = torch.randint(0, V, (2, 8))
    ctx = model.layer_context(ids.shape, ids.device)
    carried = model.embed_stage(ids, ctx)
    assert len(carried) == 2 and carried[1].shape == (2, 8, 8) and not carried[1].any()
    for stage in (model.layers[:1], model.layers[1:]):
        carried = tuple(t.clone() for t in carried)
        for layer in stage:
            carried = model.run_layer(layer, carried, ctx)
    torch.testing.assert_close(model.head_stage(carried), model(ids))
    assert sum(isinstance(m, torch.nn.GRUCell) for m in model.modules()) == 1
    assert len(build(config(family, "linear")[0]).embed_stage(ids, ctx)) == 1


def test_flops_count_active_parameters():
    """One expert of the dense width per token (top_k 1): the dense block's FLOPs plus the router's
    2 d E; the planner counts E - 1 idle experts per MoE layer as inactive."""
    E, h = 8, 24
    router = 2 * D * E
    par, _ = config("pararnn", n_experts=E, top_k=1)
    assert pararnn_layer_flops(par, "E", 16) == pararnn_layer_flops(par, "-", 16) + router
    tit, _ = config("titans-mag", n_experts=E, top_k=1)
    dense_tit, _ = config("titans-mag", n_experts=0)
    assert titans_block_flops(tit, 16) == titans_block_flops(dense_tit, 16) + router
    dep, _ = config("depth-huginn", n_experts=E, top_k=1)
    dense_dep, _ = config("depth-huginn", n_experts=0)
    assert depth_block_flops(dep, 16) == depth_block_flops(dense_dep, 16) + router
    expert = 3 * 128 * 384  # tiny-paragru / tiny-ut: d_model 128, SwiGLU width 384
    plan = make_plan("tiny-paragru", ["--model.layer_pattern", "gEgE", "--model.moe.n_experts", "4",
                                      "--model.moe.top_k", "1"])
    assert plan.parameters - plan.active_parameters == 2 * 3 * expert
    plan = make_plan("tiny-ut", ["--model.moe.n_experts", "4", "--model.moe.top_k", "1"])
    assert plan.parameters - plan.active_parameters == 3 * expert


def test_tensor_parallel_limits_name_the_expert_width():
    for family in ("pararnn", "titans-mac", "depth-ut"):
        cfg, _ = config(family, expert_hidden=20)
        spec = registry.get(type(cfg).__name__.removesuffix("Config").lower())
        assert ("tp", "the expert width (model.moe.expert_hidden)", 20) in spec.shape_limits(cfg)


@pytest.mark.parametrize("recipe, overrides, match", [
    ("tiny-paragru", ["--model.layer_pattern", "gE"], r"model.moe.n_experts = 0 is invalid: must be >= 1"),
    ("tiny-paragru", ["--model.layer_pattern", "gE", "--model.moe.n_experts", "2", "--model.moe.top_k", "3"],
     r"model.moe.top_k = 3 is invalid: must be in \[1, n_experts = 2\]"),
    ("tiny-titans-mal", ["--model.moe.n_experts", "4", "--model.moe.router_dim", "0"],
     r"model.moe.router_dim = 0 is invalid: must be >= 1"),
    ("tiny-depth", ["--model.moe.n_experts", "4", "--model.moe.router", "rmoe"],
     r"model.moe.router = 'rmoe' is invalid: the depth family loops its blocks .* use 'linear'"),
    ("tiny-ut", ["--model.moe.n_experts", "4", "--model.moe.top_k", "5"],
     r"model.moe.top_k = 5 is invalid: must be in \[1, n_experts = 4\]"),
])
def test_bad_moe_configs_refused_at_load(recipe, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, overrides)


@pytest.mark.parametrize("family", ["pararnn", "titans-mac", "depth-huginn"])
def test_export_refuses_moe_models(family):
    """The remote-code models have dense MLPs only: an MoE model is refused, not exported wrong."""
    cfg, _ = config(family)
    spec = registry.get(type(cfg).__name__.removesuffix("Config").lower())
    with pytest.raises(HFConversionError, match="mixture-of-experts"):
        spec.hf_adapter.to_hf(cfg, {}, {})
