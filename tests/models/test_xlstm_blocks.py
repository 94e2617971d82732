"""The xLSTM paper's blocks and hybrid patterns in the xlstm family: config refusals, meta build and the
xLSTM code's init, the `s` and `M` blocks against the xLSTM code (its wheel, read by tests/oracles.py),
decoding == full forward and document resets for a pattern with every letter, the spec, the tp and HF
refusals, and the first training steps of the tiny hybrid recipe."""

import pathlib
import tomllib

import pytest
import torch

from tests import oracles
from tests.models import helpers
from undertow.configtools import ConfigError
from undertow.models import registry
from undertow.models.hf_common import HFConversionError
from undertow.models.xlstm import hf, spec
from undertow.models.xlstm.config import XLSTMConfig
from undertow.models.xlstm.generate import prefill, step
from undertow.parallel.mesh import LayoutError, ParallelDims
from undertow.pretrain.config import build_config

V = 61
EVERY_LETTER = "msM*-"


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_cfg(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=len(EVERY_LETTER), layer_pattern=EVERY_LETTER, n_heads=2,
                chunk_size=4, ffn_proj_factor=1.5, ffn_round_up_to_multiple_of=16, attn_kv_heads=2)
    return XLSTMConfig(**{**base, **kw})


def build(cfg, seed=0, perturb=0.1):
    """tests/models/helpers.build, perturbed by default (a zero R and zero gates hide mistakes)."""
    return helpers.build(cfg, seed, perturb)


@pytest.mark.parametrize("changes, field, says", [
    (dict(layer_pattern="msx"), "model.layer_pattern", "unknown letters ['x']; valid: 'm' xLSTM-7B"),
    (dict(layer_pattern="ms", slstm_heads=3), "model.slstm_heads", "must divide d_model = 32"),
    (dict(layer_pattern="mM", up_heads=3), "model.up_heads", "must divide the M block's inner width 64"),
    (dict(layer_pattern="mM", up_qkv_block=5), "model.up_qkv_block", "must divide the M block's head dim 16"),
    (dict(layer_pattern="ms", conv_kernel=5), "model.conv_kernel", "must be 2, 3 or 4"),
    (dict(layer_pattern="ms", paper_norm="batchnorm"), "model.paper_norm", "'layernorm'"),
    (dict(layer_pattern="m*", attn_heads=3), "model.attn_heads", "into an even head dim"),
    (dict(layer_pattern="m*", attn_heads=4, attn_kv_heads=3), "model.attn_kv_heads", "valid: [1, 2, 4]"),
])
def test_bad_configs_are_refused_naming_field_value_and_what_is_valid(changes, field, says):
    model = {"family": "xlstm", "vocab_size": V, "d_model": 32, "n_layers": 2, **changes}
    with pytest.raises(ConfigError, match=field) as error:
        build_config({"name": "t", "model": model})
    assert says in str(error.value)


def test_meta_build_and_the_xlstm_code_initialization():
    cfg = tiny_cfg()
    model = build(cfg, perturb=0.0)
    s, up = model.layers[1].slstm, model.layers[2].mlstm
    assert s.R.shape == (4, 4, 8, 8) and s.igate.weight.shape == (4, 8, 8)
    assert model.layers[1].ffn.gate_proj.weight.shape == (48, 32)  # 1.3 * 32 rounded up to 16
    assert up.up_a.weight.shape == (64, 32) and up.q.weight.shape == (16, 4, 4) and up.igate.weight.shape == (4, 192)
    assert not s.R.any() and not s.bias[[0, 2, 3]].any()
    ramp = torch.arange(8.0) / 7  # block 1 of 5: depth 1/4
    assert torch.allclose(s.bias[1], (5.0 - 12.0 * ramp ** (0.3 + 1.3 / 4)).expand(4, 8))
    assert torch.equal(up.skip, torch.ones(64)) and torch.allclose(up.fgate.bias, torch.linspace(3.0, 6.0, 4))
    assert not up.igate.weight.any() and not up.fgate.weight.any()
    n_params = sum(p.numel() for p in model.parameters())
    matmuls = sum(spec.block_matmul_params(cfg, k) for k in EVERY_LETTER)
    others = (2 * V * 32 + 32  # embed, head, final norm
              + 2 * 2 + 32 + 2 * 32  # m: gate biases, per-head norm, two RMSNorms
              + 4 * 32 + 32 * 5 + 32 + 2 * 32  # s: gate biases, conv (weight + bias), GroupNorm, two norms
              + 64 * 5 + 2 * 4 + 64 + 64 + 32  # M: conv, gate biases, GroupNorm, skip, norm
              + 32 + 32)  # * and - norms
    assert n_params == matmuls + others
    assert torch.isfinite(model(torch.randint(0, V, (2, 9)))).all()


def _slstm_oracle(xl, cfg, index):
    ffn = xl.FeedForwardConfig(proj_factor=cfg.slstm_ffn_factor, act_fn="gelu")
    layer = xl.sLSTMLayerConfig(embedding_dim=cfg.d_model, num_heads=cfg.slstm_heads,
                                conv1d_kernel_size=cfg.conv_kernel, backend="vanilla")
    return xl.sLSTMBlock(xl.sLSTMBlockConfig(slstm=layer, feedforward=ffn, _num_blocks=cfg.n_layers,
                                             _block_idx=index))


def _mlstm_oracle(xl, cfg):
    layer = xl.mLSTMLayerConfig(embedding_dim=cfg.d_model, num_heads=cfg.up_heads, proj_factor=cfg.up_proj_factor,
                                conv1d_kernel_size=cfg.conv_kernel, qkv_proj_blocksize=cfg.up_qkv_block,
                                context_length=64)
    return xl.mLSTMBlock(xl.mLSTMBlockConfig(mlstm=layer, _num_blocks=cfg.n_layers, _block_idx=0))


def _perturbed(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return {k: v.detach() for k, v in module.state_dict().items()}


def _conv(theirs, prefix):
    """Its nn.Conv1d weight (channels, 1, width) -> ours (channels, width)."""
    return {f"{prefix}.weight": theirs["xlstm.conv1d.conv.weight"][:, 0],
            f"{prefix}.bias": theirs["xlstm.conv1d.conv.bias"]}


def test_slstm_block_equals_the_xlstm_code():
    cfg = tiny_cfg(ffn_round_up_to_multiple_of=64)
    ours = build(cfg, perturb=0.0).layers[1]
    with oracles.importing("xlstm", "xlstm") as xl:
        block = _slstm_oracle(xl, cfg, index=1)
        cell = block.xlstm.slstm_cell
        # the xLSTM code's init: its forget-gate bias profile for this depth, R zero
        assert torch.allclose(ours.slstm.bias, cell.bias[:].permute(1, 0, 2))
        assert not cell.recurrent_kernel[:].any()
        theirs = _perturbed(block)
        one = lambda name: 1.0 + theirs[name]  # its LayerNorms store weight - 1
        hidden = cfg.slstm_ffn_hidden
        mapped = {
            "norm_slstm.weight": one("xlstm_norm.weight"), "norm_ffn.weight": one("ffn_norm.weight"),
            **_conv(theirs, "slstm.conv"),
            "slstm.igate.weight": theirs["xlstm.fgate.weight"],  # its module names of i and f are swapped
            "slstm.fgate.weight": theirs["xlstm.igate.weight"],
            "slstm.zgate.weight": theirs["xlstm.zgate.weight"], "slstm.ogate.weight": theirs["xlstm.ogate.weight"],
            "slstm.R": cell.recurrent_kernel[:].permute(2, 0, 1, 3),  # (H, Dh_in, 4, Dh_out) -> (4, H, Dh_in, Dh_out)
            "slstm.bias": cell.bias[:].permute(1, 0, 2),
            "slstm.norm.weight": one("xlstm.group_norm.weight"),
            "ffn.gate_proj.weight": theirs["ffn.proj_up.weight"][:hidden],
            "ffn.up_proj.weight": theirs["ffn.proj_up.weight"][hidden:],
            "ffn.down_proj.weight": theirs["ffn.proj_down.weight"],
        }
        ours.load_state_dict(mapped)
        x = torch.randn(2, 13, cfg.d_model)
        with torch.no_grad():
            expected = block(x)
    err = rel_err(ours(x).detach(), expected)
    print(f"sLSTM block vs xLSTM code: rel err {err:.2e}")
    assert err < 1e-5


def test_mlstm_block_equals_the_xlstm_code():
    cfg = tiny_cfg(ffn_round_up_to_multiple_of=64, chunk_size=5)
    ours = build(cfg, perturb=0.0).layers[2]
    with oracles.importing("xlstm", "xlstm") as xl:
        block = _mlstm_oracle(xl, cfg)
        assert torch.equal(ours.mlstm.fgate.bias, block.xlstm.mlstm_cell.fgate.bias.detach())
        theirs = _perturbed(block)
        e = cfg.up_inner
        mapped = {
            "norm_mlstm.weight": 1.0 + theirs["xlstm_norm.weight"],
            "mlstm.up_a.weight": theirs["xlstm.proj_up.weight"][:e],  # its proj_up is [a; z]
            "mlstm.up_z.weight": theirs["xlstm.proj_up.weight"][e:],
            **_conv(theirs, "mlstm.conv"),
            **{f"mlstm.{n}.weight": theirs[f"xlstm.{n}_proj.weight"] for n in "qkv"},
            **{f"mlstm.{g}.{p}": theirs[f"xlstm.mlstm_cell.{g}.{p}"]
               for g in ("igate", "fgate") for p in ("weight", "bias")},
            "mlstm.norm.weight": 1.0 + theirs["xlstm.mlstm_cell.outnorm.weight"],
            "mlstm.skip": theirs["xlstm.learnable_skip"], "mlstm.down.weight": theirs["xlstm.proj_down.weight"],
        }
        ours.load_state_dict(mapped)
        x = torch.randn(2, 13, cfg.d_model)
        with torch.no_grad():
            expected = block(x)
    err = rel_err(ours(x).detach(), expected)
    print(f"M block vs xLSTM code: rel err {err:.2e}")
    assert err < 1e-5


def test_step_by_step_logits_match_the_full_forward_for_every_letter():
    cfg = tiny_cfg(n_layers=6, layer_pattern="msM*-s")
    model = build(cfg)
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(ids)
        last, states = prefill(model, ids[:, :5])
        steps = [last] + [step(model, ids[:, t], t, states) for t in range(5, 12)]
    err = rel_err(torch.stack(steps, 1), full[:, 4:])
    print(f"decode vs full forward: rel err {err:.2e}")
    assert err < 1e-5
    generated = model.generate(ids[:, :5], 3)
    assert torch.equal(generated[:, :5], ids[:, :5]) and generated.shape == (2, 8)


def test_documents_reset_every_state():
    """A row of two documents gives each the logits it gets alone: every recurrence (conv windows,
    mLSTM, sLSTM) restarts and attention stays inside its document."""
    model = build(tiny_cfg())
    a, b = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 6))
    doc_ids = torch.tensor([[0] * 7 + [1] * 6])
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), doc_ids=doc_ids, position_ids=positions)
        alone = torch.cat([model(a), model(b)], 1)
        by_cu = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 7, 13], dtype=torch.int32),
                      position_ids=positions)
    assert rel_err(packed, alone) < 1e-5 and rel_err(by_cu, alone) < 1e-5


def test_spec_tp_and_hf_refusals():
    cfg = tiny_cfg()
    assert spec.state_elements(cfg) == [2 * (8 * 16 + 8 + 1), 32 * 7, 64 * 3 + 4 * (16 * 16 + 17), 0, 0]
    flops = spec.layer_cost(cfg, 16)
    assert len(flops) == 5 and flops[3] == 3.0 * (2 * spec.block_matmul_params(cfg, "*") + 4 * 16 * 32)
    limits = spec.shape_limits(cfg)
    ParallelDims(tp=2).validate(2, limits)  # every block kind splits by heads (plan.py)
    paper = dict(layer_pattern="sM", n_layers=2)
    with pytest.raises(LayoutError, match=r"tp=4 does not divide slstm_heads=2; valid tp: 1, 2"):
        ParallelDims(tp=4).validate(4, spec.shape_limits(tiny_cfg(**paper, slstm_heads=2)))
    with pytest.raises(LayoutError, match=r"tp=4 does not divide up_heads=2; valid tp: 1, 2"):
        ParallelDims(tp=4).validate(4, spec.shape_limits(tiny_cfg(**paper, up_heads=2)))
    ParallelDims(tp=4).validate(4, spec.shape_limits(tiny_cfg(**paper)))
    with pytest.raises(HFConversionError, match="only all-`m` patterns export"):
        hf.hf_architecture(cfg)


def test_tiny_hybrid_recipe_first_training_steps_lower_the_loss():
    recipe = pathlib.Path(registry.__file__).parents[1] / "recipes" / "tiny-xlstm-hybrid.toml"
    model_cfg = tomllib.loads(recipe.read_text())["model"]
    cfg = build_config({"name": "t", "model": {**model_cfg, "vocab_size": 128, "d_model": 64}}).model
    assert set(cfg.pattern) >= {"m", "s", "*"}
    model = build(cfg, perturb=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (4, 33))
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("tiny hybrid losses:", [round(v, 3) for v in losses])
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0] - 0.3
