import math

import pytest
import torch

from undertow.configtools import ConfigError
from undertow.models import registry
from undertow.models.common.gated_norm import GatedRMSNorm, rms_normalize
from undertow.models.mamba.config import MambaConfig
from undertow.models.mamba.spec import flops_per_token, layer_matmul_params
from undertow.pretrain.config import build_config

V = 61


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_cfg(pattern, **kw):
    base = dict(vocab_size=V, d_model=16, layer_pattern=pattern, d_state=4, headdim=8, ngroups=2, n_heads=2,
                n_kv_heads=1, multiple_of=8, chunk_size=8)
    return MambaConfig(**{**base, **kw})


def build(cfg, seed=0):
    with torch.device("meta"):
        model = registry.build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def segments(lengths):
    doc_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return doc_ids, positions


@pytest.mark.parametrize("pattern", ["mm", "MM", "M-*m"])
def test_forward_shapes(pattern):
    model = build(tiny_cfg(pattern))
    logits = model(torch.randint(0, V, (2, 11)))
    assert logits.shape == (2, 11, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert [layer.kind for layer in model.layers] == list(pattern)


def test_parameter_names_and_shapes():
    cfg = tiny_cfg("mM*-", d_conv=3)
    params = dict(build(cfg).named_parameters())
    di, n, r = 32, 4, 1  # d_inner = 2 * 16; dt_rank = ceil(16 / 16)
    assert params["layers.0.mixer.conv_weight"].shape == (di, 3)
    assert params["layers.0.mixer.x_proj.weight"].shape == (r + 2 * n, di)
    assert params["layers.0.mixer.dt_proj.bias"].shape == (di,)
    assert params["layers.0.mixer.A_log"].shape == (di, n)
    assert params["layers.1.mixer.conv_weight"].shape == (di + 2 * 2 * n, 3)
    assert params["layers.1.mixer.in_proj_B.weight"].shape == (2 * n, 16)
    assert params["layers.1.mixer.in_proj_dt.weight"].shape == (4, 16)  # 32 / headdim 8 heads
    assert params["layers.1.mixer.norm.weight"].shape == (di,)
    assert {"layers.2.mixer.q_proj.weight", "layers.3.mixer.gate_proj.weight", "layers.3.norm.weight"} <= set(params)


def test_gradients_reach_every_parameter():
    model = build(tiny_cfg("mM*-", proj_bias=True, falcon_norm=True, tie_embeddings=False))
    model(torch.randint(0, V, (2, 9))).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pattern", ["m", "M", "*", "mM*-"])
def test_packed_documents_equal_each_document_alone(pattern):
    model = build(tiny_cfg(pattern))
    lengths = [5, 1, 9, 4]
    ids = torch.randint(0, V, (1, sum(lengths)))
    doc_ids, positions = segments(lengths)
    packed = model(ids, position_ids=positions, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        alone = model(ids[:, start : start + n])
        assert rel_err(packed[:, start : start + n], alone) < 1e-5
        start += n


def test_cu_seqlens_alone_marks_the_documents():
    model = build(tiny_cfg("mM*"))
    ids = torch.randint(0, V, (2, 8))
    cu_seqlens = torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32)  # rows: [3, 5] and [2, 6]
    doc_ids = torch.tensor([[0] * 3 + [1] * 5, [2] * 2 + [3] * 6], dtype=torch.int32)
    expected = model(ids, doc_ids=doc_ids)
    assert torch.equal(model(ids, cu_seqlens=cu_seqlens, max_seqlen=6), expected)
    assert not torch.allclose(model(ids), expected)


def test_meta_init_is_deterministic_finite_and_tied():
    cfg = tiny_cfg("mM*-")
    a, b = build(cfg, seed=3), build(cfg, seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
        assert torch.isfinite(pa).all(), name
    assert a.lm_head.weight is a.embed.weight
    dt = torch.nn.functional.softplus(a.layers[0].mixer.dt_proj.bias)
    assert dt.min() >= cfg.dt_init_floor * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert torch.allclose(a.layers[0].mixer.A_log[5], torch.log(torch.arange(1.0, 5.0)))
    A = torch.exp(a.layers[1].mixer.A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0


def test_falcon_norm_normalizes_dt_b_c():
    cfg = tiny_cfg("m")
    plain = build(cfg)
    falcon = build(tiny_cfg("m", falcon_norm=True))
    x = torch.randn(2, 5, cfg.d_inner)
    _, B, C = falcon.layers[0].mixer.ssm_inputs(x)
    assert torch.allclose(B.pow(2).mean(-1), torch.ones(2, 5), atol=1e-2)
    _, B_plain, _ = plain.layers[0].mixer.ssm_inputs(x)
    assert not torch.allclose(B, B_plain)


def test_half_precision_weights_keep_a_float32_residual():
    model = build(tiny_cfg("mM*-")).to(torch.bfloat16)
    logits = model(torch.randint(0, V, (1, 7)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_bfloat16_autocast_stays_close_to_float32():
    model = build(tiny_cfg("mM*-"))
    ids = torch.randint(0, V, (2, 16))
    ref = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) <= 1e-2
    out.float().logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gated_rms_norm_normalizes_each_group():
    norm = GatedRMSNorm(8, 4)
    y, z = torch.randn(3, 8), torch.randn(3, 8)
    gated = y * torch.nn.functional.silu(z)
    expected = torch.cat([rms_normalize(gated[:, :4], 1e-5), rms_normalize(gated[:, 4:], 1e-5)], dim=-1)
    assert torch.allclose(norm(y, z), expected, atol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(8, 3)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(layer_pattern="mMx"), "layer_pattern"),
        (dict(layer_pattern=""), "layer_pattern"),
        (dict(d_conv=5), "d_conv"),
        (dict(layer_pattern="M", headdim=7), "headdim"),
        (dict(layer_pattern="M", ngroups=3), "ngroups"),
        (dict(layer_pattern="m*", n_heads=3), "n_heads"),
        (dict(dt_max=1e-4), "dt_max"),
        (dict(mlp="relu"), "mlp"),
        (dict(position_embedding="alibi"), "position_embedding"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        tiny_cfg(kw.pop("layer_pattern", "m"), **kw).validate()


def test_config_error_lists_valid_letters():
    with pytest.raises(ConfigError, match=r"'m' Mamba-1 mixer, 'M' Mamba-2 mixer, '\*' attention, '-' MLP"):
        tiny_cfg("m+").validate()
    tiny_cfg("mm", n_heads=3, headdim=7).validate()  # fields of absent layer kinds are not checked


def test_odd_head_dim_needs_no_rope():
    """RoPE pairs the head dim's halves: an odd head dim is refused with it and runs without."""
    with pytest.raises(ConfigError, match="even head dim"):
        tiny_cfg("m*", d_model=18, n_heads=2, n_kv_heads=2).validate()
    cfg = tiny_cfg("m*", d_model=18, n_heads=2, n_kv_heads=2, position_embedding="none")
    cfg.validate()
    logits = build(cfg)(torch.randint(0, V, (2, 5)))
    assert logits.shape == (2, 5, V) and torch.isfinite(logits).all()


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_flops_count_every_projection_once(mlp):
    cfg = tiny_cfg("mM*-", tie_embeddings=False, mlp=mlp)
    model = build(cfg)
    linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert sum(layer_matmul_params(cfg, k) for k in cfg.layer_pattern) == linear
    recurrent = tiny_cfg("mM")
    assert flops_per_token(recurrent, 64) == flops_per_token(recurrent, 64 * 8)  # chunk_size 8 < 64
    attn = tiny_cfg("*")
    assert flops_per_token(attn, 200) - flops_per_token(attn, 100) == 3 * 4 * 100 * 16
    assert registry.get("mamba").flops_per_token is flops_per_token


def test_config_errors_list_the_mlp_and_position_embedding_choices():
    with pytest.raises(ConfigError, match=r"model.mlp = 'relu' is invalid: choose one of 'swiglu' .*, 'gelu'"):
        tiny_cfg("M-", mlp="relu").validate()
    with pytest.raises(ConfigError, match=r"model.position_embedding = 'alibi' is invalid: choose one of 'rope' .*, 'none'"):
        tiny_cfg("M*", position_embedding="alibi").validate()
    with pytest.raises(ConfigError, match=r"model.mlp = 'relu' is not allowed; choose one of \['swiglu', 'gelu'\]"):
        build_config({"name": "t", "model": {"family": "mamba", "mlp": "relu"}})


def test_mlp_width_defaults_per_kind():
    assert tiny_cfg("-", d_model=48).hidden == 128  # SwiGLU: 8/3 * 48 rounded up to multiple_of 8
    assert tiny_cfg("-", d_model=48, mlp="gelu").hidden == 4 * 48  # Megatron-LM's 4 * hidden
    assert tiny_cfg("-", mlp="gelu", ffn_hidden=40).hidden == 40


def megatron_hybrid(**kw):
    """A tiny Mamba-2-Hybrid as NVIDIA released it: GELU MLP, attention without positional encoding."""
    return tiny_cfg("M-*-M-", mlp="gelu", position_embedding="none", tie_embeddings=False, **kw)


def test_gelu_hybrid_without_position_embedding_trains():
    model = build(megatron_hybrid())
    params = dict(model.named_parameters())
    assert params["layers.1.mixer.fc1.weight"].shape == (64, 16)  # 4 * d_model hidden units, no biases
    assert params["layers.1.mixer.fc2.weight"].shape == (16, 64)
    assert {name for name in params if name.startswith("layers.3.")} == {
        "layers.3.norm.weight", "layers.3.mixer.fc1.weight", "layers.3.mixer.fc2.weight"}  # no biases, no gate
    model(torch.randint(0, V, (2, 9))).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gelu_mlp_is_fc2_of_exact_gelu_of_fc1():
    model = build(megatron_hybrid())
    mlp = model.layers[1].mixer
    x = torch.randn(2, 5, 16)
    h = x @ mlp.fc1.weight.T
    expected = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ mlp.fc2.weight.T  # erf GELU, not tanh
    assert rel_err(mlp(x), expected) < 1e-6
    assert mlp.fc2.weight.std() < mlp.fc1.weight.std() / 2  # output projection scaled by depth like SwiGLU's


@pytest.mark.parametrize("position_embedding", ["none", "rope"])
def test_attention_position_dependence(position_embedding):
    """Without a positional encoding attention ignores position_ids; RoPE is relative (a uniform shift
    changes nothing) but depends on the gaps between positions."""
    model = build(tiny_cfg("M*-", position_embedding=position_embedding, init_std=0.5))
    attn = model.layers[1].mixer
    h = torch.randn(2, 10, 16)
    positions = torch.arange(10).expand(2, 10)
    ref = attn(h, *model.rope(positions))
    assert rel_err(attn(h, *model.rope(positions + 7)), ref) < 1e-5
    spread = attn(h, *model.rope(3 * positions))
    if position_embedding == "none":
        assert model.rope(positions) == (None, None)  # no tables computed
        assert torch.equal(spread, ref)
        ids = torch.randint(0, V, (2, 10))
        assert torch.equal(model(ids, position_ids=3 * positions + 7), model(ids))
    else:
        assert rel_err(spread, ref) > 1e-2
