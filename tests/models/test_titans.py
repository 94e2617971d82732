"""The Titans family: config refusals, meta build, decoding equal to the full forward (MAC, MAG, MAL;
MLP and linear memories, the Omega rule), documents restarting the memory, sliding windows, the
tiny recipe training at T = 4096 without NaN, the spec and the planner."""

import math

import pytest
import torch

from tests.models.helpers import build, greedy_by_full_forwards
from undertow.configtools import ConfigError
from undertow.models import registry
from undertow.models.common.attention import causal_attention
from undertow.models.titans.config import TitansConfig
from undertow.models.titans.generate import prefill, step
from undertow.pretrain.config import build_config

V = 53
VARIANTS = ["mac", "mag", "mal"]


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are tiny: one thread avoids OpenMP's barriers (which dominate on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, mem_heads=2, chunk_size=4, segment_len=8,
                window=6, persistent_tokens=2, ffn_hidden=48)
    return TitansConfig(**{**base, **kw})


@pytest.mark.parametrize("changes, field, says", [
    (dict(chunk_size=3), "model.chunk_size", "must divide segment_len = 8 (memory chunks never straddle a "
                                             "segment); valid: [1, 2, 4, 8]"),
    (dict(window=9), "model.window", "must be in 1..segment_len = 8"),
    (dict(mem_depth=0), "model.mem_depth", "must be an int >= 1 (1: a linear memory, >= 2: an MLP"),
    (dict(variant="mat"), "model.variant", "choose one of ['mac', 'mag', 'mal']"),
    (dict(mem_heads=3), "model.mem_heads", "must divide d_model = 32"),
])
def test_bad_configs_are_refused_naming_field_value_and_what_is_valid(changes, field, says):
    model = {"family": "titans", "vocab_size": V, "d_model": 32, "n_layers": 2, "chunk_size": 4, "segment_len": 8,
             "window": 8, **changes}
    with pytest.raises(ConfigError, match=field) as error:
        build_config({"name": "t", "model": model})
    assert says in str(error.value)
    with pytest.raises(ConfigError, match=field):  # and the model refuses to be built from it
        registry.build_model(TitansConfig(**{k: v for k, v in model.items() if k != "family"}))


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_build_and_init(variant):
    model = build(tiny_cfg(variant=variant))
    params = dict(model.named_parameters())
    inner = "layers.0." if variant == "mal" else "layers.0.mixer."  # MAC, MAG: one mixer module
    assert params[inner + "mem.memory.0"].shape == (2, 16, 32)  # M_0: (heads, Dk, hidden)
    assert params[inner + "mem.memory.1"].shape == (2, 32, 16)
    assert params[inner + "attn.persistent"].shape == (2, 32)
    assert all(torch.isfinite(p).all() for p in params.values())


@pytest.mark.parametrize("changes", [dict(), dict(mem_depth=1), dict(omega_window=3, mem_loss="huber")],
                         ids=["mlp", "linear", "omega-huber"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_by_step_logits_match_the_full_forward(variant, changes):
    """The prompt, then one token at a time across chunk, segment and window boundaries (T = 21 > 2
    segments of 8, chunks of 4, window 6): every position's logits equal the full forward's."""
    model = build(tiny_cfg(variant=variant, **changes), perturb=0.02).double()
    ids = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        logits, states = prefill(model, ids[:, :5])
        errors = [(logits - full[:, 4]).abs().max()]
        for p in range(5, 21):
            errors.append((step(model, ids[:, p], p, states) - full[:, p]).abs().max())
    assert max(errors) <= 1e-10 * full.abs().max()


def test_greedy_generation_equals_argmax_of_repeated_full_forwards():
    model = build(tiny_cfg(variant="mac"), perturb=0.05)
    prompt = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(prompt, 10), greedy_by_full_forwards(model, prompt, 10))


@pytest.mark.parametrize("variant", VARIANTS)
def test_documents_restart_the_memory(variant):
    """A document packed after another, starting on a segment (and chunk) boundary, with positions
    restarting: its logits equal the document run alone. (A document starting inside a chunk is
    isolated too, but its gradients are then taken at other chunk starts than alone: the chunk rule.)"""
    model = build(tiny_cfg(variant=variant), perturb=0.02).double()
    ids = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(3))
    docs = torch.tensor([[0] * 8 + [1] * 13, [0] * 21])
    pos = torch.stack([torch.cat([torch.arange(8), torch.arange(13)]), torch.arange(21)])
    with torch.no_grad():
        packed = model(ids, doc_ids=docs, position_ids=pos)
        alone = model(ids[:1, 8:])
        first = model(ids[:1, :8])
    assert (packed[0, 8:] - alone[0]).abs().max() <= 1e-12
    assert (packed[0, :8] - first[0]).abs().max() <= 1e-12


def test_sliding_window_attention_through_the_dispatch():
    """causal_attention(window=w) equals full attention restricted by hand to the last w keys, with
    and without documents."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 12, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    for doc_ids in (None, docs):
        out = causal_attention(q, k, v, doc_ids=doc_ids, window=4)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
        t, s = torch.arange(12)[:, None], torch.arange(12)[None, :]
        allowed = (s <= t) & (t - s < 4)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        expect = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        assert (out - expect).abs().max() <= 1e-12


def test_tiny_recipe_trains_at_4096_tokens_without_nan():
    """The tiny recipe's shape (narrowed), a few AdamW steps on rows of 4096 tokens at a high learning
    rate: the loss and every gradient stay finite (titans-pytorch users saw NaNs at this length)."""
    from undertow.pretrain.config import load_config

    cfg = load_config("tiny-titans-mac").model
    cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.segment_len, cfg.window = V, 32, 1, 512, 512
    cfg.chunk_size = 64
    model = build(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, V, (1, 4097), generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, V), ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        assert torch.isfinite(loss) and torch.isfinite(norm), (loss, norm)
        optimizer.step()


def test_spec_and_planner():
    from undertow.planning.summary import make_plan

    spec = registry.get("titans")
    cfg = tiny_cfg()
    assert spec.flops_per_token(cfg, 64) > 0 and len(spec.layer_cost(cfg, 64)) == 2
    assert spec.state_elements(cfg) == [2 * 2 * (16 * 32 + 32 * 16)] * 2
    plan = make_plan("tiny-titans-mac")
    assert plan.family == "titans" and plan.layers == 2


def test_memory_recompute_gives_the_same_gradients():
    """mem_recompute (the memory's chunks checkpointed) changes no gradient."""
    ids = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(6))
    grads = []
    for recompute in (False, True):
        model = build(tiny_cfg(variant="mag", mem_recompute=recompute), perturb=0.02)
        torch.nn.functional.cross_entropy(model(ids).reshape(-1, V), ids.reshape(-1)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max().clamp_min(1e-12)


def test_7b_mac_recipe_builds_on_meta_and_plans_on_8_gpus(capsys):
    from undertow.cli import main
    from undertow.pretrain.config import load_config

    cfg = load_config("titans-7b-mac").model
    with torch.device("meta"):
        model = registry.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 7_058_437_296  # the recipe's comment
    assert main(["plan", "titans-7b-mac", "--gpus", "8"]) == 0
    assert "titans-7b-mac" in capsys.readouterr().out


@pytest.mark.parametrize("variant", VARIANTS)
def test_context_parallel_split_must_hold_whole_segments(variant):
    """A cp slice holds whole segments (chunks divide them, windows fit in them): anything else is
    refused before any work, with the cp degrees that would do."""
    from undertow.parallel.mesh import LayoutError, ParallelDims

    def check(seq_len, cp):
        cfg = build_config({"name": "t", "model": {"family": "titans", "variant": variant, "vocab_size": V,
                                                   "segment_len": 32, "chunk_size": 8, "window": 16},
                            "data": {"seq_len": seq_len}, "parallel": {"cp": cp}})
        ParallelDims(cp=cp).validate(cp, cfg.layout_limits())

    check(128, 4)  # slices of 32: one segment each
    with pytest.raises(LayoutError, match=r"cp=2 does not divide seq_len / segment_len = 96 / 32 .*=3; valid cp: 1, 3"):
        check(96, 2)  # slices of 48 hold whole chunks of 8 but cut a segment
    with pytest.raises(LayoutError, match=r"valid cp: 1$"):
        check(100, 2)  # no whole number of segments
