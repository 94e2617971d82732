import pytest
import torch

from undertow.models import registry
from undertow.models.common.attention import causal_attention, document_causal_mask
from undertow.models.common.rope import apply_rope, rope_cos_sin
from undertow.models.transformer.config import TransformerConfig


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_model(seed=0, **kw):
    cfg = TransformerConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, **kw)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = registry.build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def segments_to_doc_ids(lengths):
    return torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])


def test_attention_with_boundaries_equals_each_document_alone():
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    T, H, Hkv, D = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(1, T, H, D), torch.randn(1, T, Hkv, D), torch.randn(1, T, Hkv, D)
    doc_ids = segments_to_doc_ids(lengths)[None]
    packed = causal_attention(q, k, v, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = causal_attention(q[:, sl], k[:, sl], v[:, sl])
        assert rel_err(packed[:, sl], alone) < 1e-6
        start += n


def test_gqa_equals_repeated_kv_heads():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    grouped = causal_attention(q, k, v)
    full = causal_attention(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    assert rel_err(grouped, full) < 1e-6


def test_document_mask_is_block_diagonal_causal():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_forcing_flash_without_it_fails_loudly(monkeypatch):
    monkeypatch.setenv("UNDERTOW_ATTENTION_BACKEND", "flash")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="flash"):
        causal_attention(q, q, q)
    monkeypatch.setenv("UNDERTOW_ATTENTION_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown"):
        causal_attention(q, q, q)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), 16, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), 16, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert score(7, 3).item() == pytest.approx(score(104, 100).item(), rel=1e-4)


def test_packed_model_forward_equals_each_document_alone():
    model = tiny_model()
    lengths = [6, 11, 4]
    ids = torch.randint(0, 97, (1, sum(lengths)))
    doc_ids = segments_to_doc_ids(lengths)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, position_ids=positions, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        alone = model(ids[:, start : start + n])
        assert rel_err(packed[:, start : start + n], alone) < 1e-5
        start += n


def test_meta_init_is_deterministic_and_finite():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
        assert torch.isfinite(pa).all()
    assert a.lm_head.weight is a.embed.weight  # tied


def test_gradients_reach_every_parameter():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 9))
    model(ids).float().logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_flops_per_token_matches_parameter_count():
    cfg = TransformerConfig(vocab_size=1000, d_model=64, n_layers=3, n_heads=4, multiple_of=16, tie_embeddings=False)
    spec = registry.get("transformer")
    with torch.device("meta"):
        model = spec.model_cls(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n)
    assert spec.flops_per_token(cfg, 128) == 6 * matmul + 12 * 3 * 64 * 128
