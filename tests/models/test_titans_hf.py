"""Titans <-> Hugging Face through remote code: `convert to-hf` writes a directory that transformers
loads with trust_remote_code in a process where undertow cannot be imported, with the same logits
(within 1e-4, float32) and greedy text for MAC, MAG and MAL; `from-hf` back is lossless."""

import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.hf.remote_load import load_without_undertow  # noqa: E402
from tests.models.helpers import greedy_by_full_forwards  # noqa: E402
from undertow.cli import main  # noqa: E402
from undertow.data_prep.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from undertow.hf.export import read_checkpoint  # noqa: E402
from undertow.hf.remote import remote_sources  # noqa: E402
from undertow.models.titans.config import TitansConfig  # noqa: E402
from undertow.models.titans.hf import REMOTE_CODE  # noqa: E402
from undertow.models.titans.model import TitansLM  # noqa: E402
from undertow.pretrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from undertow.pretrain.config import build_config  # noqa: E402

from ..data_prep.conftest import make_texts  # noqa: E402

VOCAB = 300
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, mem_heads=2, chunk_size=4, segment_len=8,
            window=6, persistent_tokens=2, ffn_hidden=48, max_lr=0.5)
CASES = {  # every variant; MLP and linear memories, l2 and Huber, momentum and sgd, the Omega window
    "mac": dict(variant="mac", mem_depth=2, tie_embeddings=True),
    "mag": dict(variant="mag", mem_depth=1, mem_loss="huber", huber_delta=0.5, omega_window=3, max_grad_norm=0.3),
    "mal": dict(variant="mal", mem_depth=3, mem_optimizer="sgd", mem_retention="none", persistent_tokens=0,
                max_grad_norm=0.0),
}
# 13 tokens: partial chunks (4) and segments (8); the window (6) slides
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))

# what the remote model computes, in a process where undertow cannot be imported (tests/hf/remote_load.py)
BODY = """
out["logits"] = model(ids).logits
out["generated"] = model.generate(ids[:, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
"""


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(make_texts(300, seed=1), path, vocab_size=VOCAB)
    return path


def make_checkpoint(root, spm_path: str, case: str) -> str:
    torch.manual_seed(0)
    model_cfg = TitansConfig(**{**BASE, **CASES[case]})
    model = TitansLM(model_cfg)
    model.init_weights()
    with torch.no_grad():  # away from the init's constants (biases, M_0's scale), so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = build_config({"name": "t", "model": {"family": "titans", **dataclasses.asdict(model_cfg)}})
    meta = {"config": cfg.to_dict(), "tokenizer": Tokenizer.load(spm_path).describe(os.path.abspath(spm_path))}
    return save_checkpoint(str(root), 3, model, torch.optim.AdamW(model.parameters()), meta, keep_last=1)


def our_model(checkpoint: str) -> TitansLM:
    _, _, model_cfg = read_checkpoint(checkpoint)
    model = TitansLM(model_cfg)
    load_checkpoint(checkpoint, model, None)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spm_path):
    """Every case exported with `convert to-hf`: ({case: checkpoint}, {case: dir}, {case: transformers' results})."""
    root = tmp_path_factory.mktemp("export")
    checkpoints, dirs = {}, {}
    for case in CASES:
        checkpoints[case] = make_checkpoint(root / case / "ckpt", spm_path, case)
        dirs[case] = str(root / case / "hf")
        assert main(["convert", "to-hf", checkpoints[case], dirs[case]]) == 0
    return checkpoints, dirs, load_without_undertow(BODY, dirs, IDS, root)


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_without_undertow_with_same_logits_and_greedy_text(exported, case):
    checkpoints, dirs, results = exported
    out, theirs = dirs[case], results[case]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "undertow_titans" and config["architectures"] == ["UndertowTitansForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_undertow_titans.UndertowTitansForCausalLM"
    assert set(REMOTE_CODE.files) <= set(os.listdir(out))
    assert theirs["type"] == "UndertowTitansForCausalLM"
    ours = our_model(checkpoints[case])
    with torch.no_grad():
        expect = ours(IDS)
        assert expect.abs().max() > 0.1  # not a degenerate model
        assert (theirs["logits"] - expect).abs().max().item() <= 1e-4
    assert torch.equal(theirs["generated"], greedy_by_full_forwards(ours, IDS[:, :4], 6))


@pytest.mark.parametrize("case", ["mac", "mag"])
def test_round_trip_to_hf_from_hf_is_lossless(tmp_path, spm_path, case):
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, case)
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 0
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    before, after = our_model(ckpt), our_model(str(tmp_path / "back"))
    assert before.cfg == after.cfg
    assert before.state_dict().keys() == after.state_dict().keys()
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name
    if before.cfg.tie_embeddings:
        assert after.lm_head.weight is after.embed.weight


def test_remote_code_imports_no_undertow():
    assert set(remote_sources(REMOTE_CODE)) == set(REMOTE_CODE.files)
