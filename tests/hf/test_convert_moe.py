"""MoE transformers -> MixtralForCausalLM (stock transformers) with the same logits, and back exactly;
a shared expert, which Mixtral cannot compute, refused with the reason (the RMoE router exports with
remote code: test_convert_rmoe.py)."""

import dataclasses
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from undertow.cli import main  # noqa: E402
from undertow.data_prep.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from undertow.hf.export import read_checkpoint  # noqa: E402
from undertow.models.moe.config import MoEConfig  # noqa: E402
from undertow.models.transformer.config import TransformerConfig  # noqa: E402
from undertow.models.transformer.model import TransformerLM  # noqa: E402
from undertow.pretrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from undertow.pretrain.config import build_config  # noqa: E402

from ..data_prep.conftest import make_texts  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(make_texts(300, seed=1), path, vocab_size=VOCAB)
    return path


def make_checkpoint(root, spm_path: str, tie: bool = False, **moe) -> str:
    """A trainer-format checkpoint of a tiny random MoE transformer (grouped-query attention, 5 experts
    top-2 of width 24, weights perturbed so the routing is far from uniform)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                            rope_theta=5000.0, tie_embeddings=tie, init_std=0.1,
                            moe=MoEConfig(**{"n_experts": 5, "top_k": 2, "expert_hidden": 24, **moe}))
    model = TransformerLM(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    exp = build_config({"name": "t", "model": {"family": "transformer", **dataclasses.asdict(cfg)}})
    meta = {"config": exp.to_dict(), "tokenizer": Tokenizer.load(spm_path).describe(os.path.abspath(spm_path))}
    return save_checkpoint(str(root), 3, model, torch.optim.AdamW(model.parameters()), meta, keep_last=1)


def our_model(checkpoint: str) -> TransformerLM:
    _, _, cfg = read_checkpoint(checkpoint)
    model = TransformerLM(cfg)
    load_checkpoint(checkpoint, model, None)
    return model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_export_is_mixtral_with_same_logits_and_round_trips(tmp_path, spm_path, tie):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, tie=tie)
    out, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert main(["convert", "to-hf", ckpt, out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ours = our_model(ckpt)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(ids), hf(ids).logits
    assert (got - want).abs().max().item() <= 1e-4

    assert main(["convert", "from-hf", out, back]) == 0
    _, family, cfg = read_checkpoint(back)
    assert family == "transformer" and cfg == read_checkpoint(ckpt)[2]
    a, b = ours.state_dict(), our_model(back).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("moe, reason", [
    (dict(shared_expert_hidden=16), "Mixtral has no shared expert"),
])
def test_what_mixtral_cannot_compute_is_refused(tmp_path, spm_path, capsys, moe, reason):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, **moe)
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 2
    assert reason in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")
