"""Recurrent-depth models <-> Hugging Face through remote code: `convert to-hf` writes a directory
that transformers loads with trust_remote_code in a process where undertow cannot be imported, with
the same logits (fixed depth) and greedy text; `from-hf` back is lossless; the mechanism refuses
modeling code that imports undertow."""

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.models.helpers import greedy_by_full_forwards  # noqa: E402
from undertow.cli import main  # noqa: E402
from undertow.data_prep.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from undertow.hf.export import read_checkpoint  # noqa: E402
from undertow.models.depth.config import DepthConfig  # noqa: E402
from undertow.models.depth.model import DepthLM  # noqa: E402
from undertow.pretrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from undertow.pretrain.config import build_config  # noqa: E402

from ..data_prep.conftest import make_texts  # noqa: E402

VOCAB = 300
CASES = {
    "huginn": dict(arch="huginn", vocab_size=VOCAB, d_model=32, n_heads=4, ffn_hidden=48, n_prelude=1, n_core=2,
                   n_coda=1, mean_depth=3.0, max_depth=8, backprop_depth=2, rope_theta=50000.0),
    "huginn-untied-gqa": dict(arch="huginn", vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                              n_prelude=0, n_core=1, n_coda=2, mean_depth=2.0, max_depth=8, backprop_depth=1,
                              tie_embeddings=False, qk_bias=False, depth_seed=5),
    "ut": dict(arch="ut", vocab_size=VOCAB, d_model=32, n_heads=4, ffn_hidden=48, max_steps=4),
}

# Runs with -I -S: no PYTHONPATH, no user site, no .pth files (so not undertow's editable finder);
# only the standard library and the environment's site-packages (torch, transformers).
LOAD_SCRIPT = r"""
import importlib.util, sys
sys.path.append(SITE)
assert importlib.util.find_spec("undertow") is None, "undertow must not be importable here"
import torch
from transformers import AutoModelForCausalLM
ids = torch.load(IDS)
results = {}
for name, hf_dir in DIRS.items():
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    out = results[name] = {"type": type(model).__name__}
    with torch.no_grad():
        out["logits"] = model(ids).logits
        out["logits_deeper"] = model(ids, num_steps=5).logits if model.config.arch == "huginn" else None
        out["generated"] = model.generate(ids[:, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                          use_cache=False)
torch.save(results, OUT)
"""


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(make_texts(300, seed=1), path, vocab_size=VOCAB)
    return path


def make_checkpoint(root, spm_path: str, case: str) -> str:
    torch.manual_seed(0)
    model_cfg = DepthConfig(**CASES[case])
    model = DepthLM(model_cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = build_config({"name": "t", "model": {"family": "depth", **dataclasses.asdict(model_cfg)}})
    meta = {"config": cfg.to_dict(), "tokenizer": Tokenizer.load(spm_path).describe(os.path.abspath(spm_path))}
    return save_checkpoint(str(root), 3, model, torch.optim.AdamW(model.parameters()), meta, keep_last=1)


def our_model(checkpoint: str) -> DepthLM:
    _, _, model_cfg = read_checkpoint(checkpoint)
    model = DepthLM(model_cfg)
    load_checkpoint(checkpoint, model, None)
    return model.eval()


IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))


def load_without_undertow(dirs: dict, tmp_path) -> dict:
    """{case: HF directory} -> {case: what transformers computed}, all in one subprocess (starting
    torch and transformers is most of its time)."""
    torch.save(IDS, tmp_path / "ids.pt")
    script = LOAD_SCRIPT.replace("SITE", repr(sysconfig.get_paths()["purelib"])).replace(
        "DIRS", repr(dirs)).replace("IDS", repr(str(tmp_path / "ids.pt"))).replace(
        "OUT", repr(str(tmp_path / "out.pt")))
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spm_path) -> tuple[dict, dict]:
    """Every case exported with `convert to-hf`: ({case: checkpoint}, {case: transformers' results})."""
    root = tmp_path_factory.mktemp("export")
    checkpoints, dirs = {}, {}
    for case in CASES:
        checkpoints[case] = make_checkpoint(root / case / "ckpt", spm_path, case)
        dirs[case] = str(root / case / "hf")
        assert main(["convert", "to-hf", checkpoints[case], dirs[case]]) == 0
    return checkpoints, dirs, load_without_undertow(dirs, root)


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_without_undertow_with_same_logits_and_greedy_text(exported, case):
    checkpoints, dirs, results = exported
    out, theirs = dirs[case], results[case]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "undertow_depth" and config["architectures"] == ["UndertowDepthForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_undertow_depth.UndertowDepthForCausalLM"
    assert {"modeling_undertow_depth.py", "configuration_undertow_depth.py"} <= set(os.listdir(out))
    assert theirs["type"] == "UndertowDepthForCausalLM"
    ours = our_model(checkpoints[case])
    with torch.no_grad():
        assert (theirs["logits"] - ours(IDS)).abs().max().item() <= 1e-4
        if ours.core is not None:  # another fixed depth, chosen at call time
            ours.set_depth(5)
            assert (theirs["logits_deeper"] - ours(IDS)).abs().max().item() <= 1e-4
            ours.set_depth(None)
    assert torch.equal(theirs["generated"], greedy_by_full_forwards(ours, IDS[:, :4], 6))


def test_round_trip_to_hf_from_hf_is_lossless(tmp_path, spm_path):
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
