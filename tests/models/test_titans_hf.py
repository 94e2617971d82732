"""Titans <-> Hugging Face through remote code: `convert to-hf` writes a directory that transformers
loads with trust_remote_code in a process where undertow cannot be imported, with the same logits
(within 1e-4, float32) and greedy text for MAC, MAG and MAL; `from-hf` back is lossless."""


import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.hf.remote_load import (VOCAB, check_export_dir, exported_fixture, load_ours,  # noqa: E402,F401
                                  perturbed_checkpoint, spm_path)
from tests.models.helpers import greedy_by_full_forwards  # noqa: E402
from undertow.cli import main  # noqa: E402
from undertow.hf.remote import remote_sources  # noqa: E402
from undertow.models.titans.config import TitansConfig  # noqa: E402
from undertow.models.titans.hf import REMOTE_CODE  # noqa: E402
from undertow.models.titans.model import TitansLM  # noqa: E402

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


def make_checkpoint(root, spm_path: str, case: str) -> str:  # noqa: F811
    # away from the init's constants (biases, M_0's scale), so every weight matters
    model_cfg = TitansConfig(**{**BASE, **CASES[case]})
    return perturbed_checkpoint(root, spm_path, "titans", TitansLM, model_cfg, noise=0.05)


def our_model(checkpoint: str) -> TitansLM:
    return load_ours(checkpoint, TitansLM)


exported = exported_fixture(CASES, make_checkpoint, BODY, IDS)  # every case exported and loaded


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_without_undertow_with_same_logits_and_greedy_text(exported, case):
    checkpoints, dirs, results = exported
    out, theirs = dirs[case], results[case]
    check_export_dir(out, theirs, "undertow_titans", "UndertowTitansForCausalLM")
    ours = our_model(checkpoints[case])
    with torch.no_grad():
        expect = ours(IDS)
        assert expect.abs().max() > 0.1  # not a degenerate model
        assert (theirs["logits"] - expect).abs().max().item() <= 1e-4
    assert torch.equal(theirs["generated"], greedy_by_full_forwards(ours, IDS[:, :4], 6))


@pytest.mark.parametrize("case", ["mac", "mag"])
def test_round_trip_to_hf_from_hf_is_lossless(tmp_path, spm_path, case):  # noqa: F811
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
