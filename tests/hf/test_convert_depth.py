"""Recurrent-depth models <-> Hugging Face through remote code: `convert to-hf` writes a directory
that transformers loads with trust_remote_code in a process where undertow cannot be imported, with
the same logits (fixed depth) and greedy text; `from-hf` back is lossless; the mechanism refuses
modeling code that imports undertow."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.hf.remote_load import (VOCAB, check_export_dir, exported_fixture, load_ours,  # noqa: E402,F401
                                  perturbed_checkpoint, spm_path)
from tests.models.helpers import greedy_by_full_forwards  # noqa: E402
from undertow.cli import main  # noqa: E402
from undertow.models.depth.config import DepthConfig  # noqa: E402
from undertow.models.depth.model import DepthLM  # noqa: E402

CASES = {
    "huginn": dict(arch="huginn", vocab_size=VOCAB, d_model=32, n_heads=4, ffn_hidden=48, n_prelude=1, n_core=2,
                   n_coda=1, mean_depth=3.0, max_depth=8, backprop_depth=2, rope_theta=50000.0),
    "huginn-untied-gqa": dict(arch="huginn", vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                              n_prelude=0, n_core=1, n_coda=2, mean_depth=2.0, max_depth=8, backprop_depth=1,
                              tie_embeddings=False, qk_bias=False, depth_seed=5),
    "ut": dict(arch="ut", vocab_size=VOCAB, d_model=32, n_heads=4, ffn_hidden=48, max_steps=4),
}
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
# what transformers computes from each exported directory (tests/hf/remote_load.py); huginn also at depth 5
LOAD = """
out["logits"] = model(ids).logits
out["logits_deeper"] = model(ids, num_steps=5).logits if model.config.arch == "huginn" else None
out["generated"] = model.generate(ids[:, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
"""


def make_checkpoint(root, spm_path: str, case: str) -> str:  # noqa: F811
    return perturbed_checkpoint(root, spm_path, "depth", DepthLM, DepthConfig(**CASES[case]), noise=0.05)


def our_model(checkpoint: str) -> DepthLM:
    return load_ours(checkpoint, DepthLM)


exported = exported_fixture(CASES, make_checkpoint, LOAD, IDS)  # every case exported and loaded


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_without_undertow_with_same_logits_and_greedy_text(exported, case):
    checkpoints, dirs, results = exported
    out, theirs = dirs[case], results[case]
    check_export_dir(out, theirs, "undertow_depth", "UndertowDepthForCausalLM")
    ours = our_model(checkpoints[case])
    with torch.no_grad():
        assert (theirs["logits"] - ours(IDS)).abs().max().item() <= 1e-4
        if ours.core is not None:  # another fixed depth, chosen at call time
            ours.set_depth(5)
            assert (theirs["logits_deeper"] - ours(IDS)).abs().max().item() <= 1e-4
            ours.set_depth(None)
    assert torch.equal(theirs["generated"], greedy_by_full_forwards(ours, IDS[:, :4], 6))


def test_round_trip_to_hf_from_hf_is_lossless(tmp_path, spm_path):  # noqa: F811
    ckpt = make_checkpoint(tmp_path / "ckpt", spm_path, "huginn")
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf")]) == 0
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    before, after = our_model(ckpt), our_model(str(tmp_path / "back"))
    assert before.cfg == after.cfg
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name
    assert after.lm_head.weight is after.embed.weight


def test_remote_code_importing_undertow_is_refused(tmp_path, monkeypatch):
    from undertow.hf import HFConversionError
    from undertow.hf.remote import remote_sources
    from undertow.models.depth.hf import REMOTE_CODE

    assert set(remote_sources(REMOTE_CODE)) == set(REMOTE_CODE.files)
    package = tmp_path / "fake_remote"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "configuration_fake.py").write_text("from transformers import PretrainedConfig\n")
    (package / "modeling_fake.py").write_text("from undertow.models.common.mlp import SwiGLU\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = dataclasses.replace(REMOTE_CODE, name="fake", package="fake_remote")
    with pytest.raises(HFConversionError, match="modeling_fake imports undertow"):
        remote_sources(fake)
