"""Load exported remote-code directories with transformers in a process where undertow cannot be
imported (`python -I -S`: no PYTHONPATH, no user site, no .pth files, so not undertow's editable
finder; only the standard library and the environment's site-packages, torch and transformers).

    results = load_without_undertow(BODY, {case: hf_dir}, ids, tmp_path)

BODY is Python run once per directory with `model` (AutoModelForCausalLM, trust_remote_code, eval,
under no_grad), `ids` (the tensor passed in) and `out` (a dict to fill); returns {case: out}.

The export tests' other shared steps (this process, where undertow is imported):

    spm_path                                     module fixture: a VOCAB-piece tokenizer
    perturbed_checkpoint(root, spm_path, family, model_cls, model_cfg, noise)  -> checkpoint dir
    load_ours(checkpoint, model_cls)             -> our model from a checkpoint, eval
    exported = exported_fixture(cases, make, BODY, ids)   module fixture: every case exported and loaded
    check_export_dir(hf_dir, out, model_type, model_class)   asserts the directory names its remote code
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from typing import Callable

import pytest
import torch

from tests.data_prep.conftest import make_texts
from undertow.cli import main
from undertow.data_prep.tokenizer import Tokenizer, train_tokenizer
from undertow.hf.export import read_checkpoint
from undertow.pretrain.checkpoint import load_checkpoint, save_checkpoint
from undertow.pretrain.config import build_config

VOCAB = 300

_SCRIPT = r"""
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
BODY
torch.save(results, OUT)
"""


def load_without_undertow(body: str, dirs: dict, ids: torch.Tensor, tmp_path) -> dict:
    """All directories in one subprocess (starting torch and transformers is most of its time)."""
    torch.save(ids, tmp_path / "ids.pt")
    script = _SCRIPT.replace("SITE", repr(sysconfig.get_paths()["purelib"])).replace(
        "DIRS", repr(dirs)).replace("IDS", repr(str(tmp_path / "ids.pt"))).replace(
        "OUT", repr(str(tmp_path / "out.pt"))).replace("BODY", textwrap.indent(textwrap.dedent(body), " " * 8))
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(make_texts(300, seed=1), path, vocab_size=VOCAB)
    return path


def perturbed_checkpoint(root, spm_path: str, family: str, model_cls, model_cfg, noise: float) -> str:
    """A checkpoint of model_cls(model_cfg) after init_weights, every parameter moved by noise * N(0, 1)
    (away from the init's constants, so every weight matters to the logits)."""
    torch.manual_seed(0)
    model = model_cls(model_cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    cfg = build_config({"name": "t", "model": {"family": family, **dataclasses.asdict(model_cfg)}})
    meta = {"config": cfg.to_dict(), "tokenizer": Tokenizer.load(spm_path).describe(os.path.abspath(spm_path))}
    return save_checkpoint(str(root), 3, model, torch.optim.AdamW(model.parameters()), meta, keep_last=1)


def load_ours(checkpoint: str, model_cls):
    _, _, model_cfg = read_checkpoint(checkpoint)
    model = model_cls(model_cfg)
    load_checkpoint(checkpoint, model, None)
    return model.eval()


def exported_fixture(cases, make: Callable, body: str, ids: torch.Tensor):
    """A module-scoped fixture: every case's checkpoint (make(dir, spm_path, case)) exported with
    `convert to-hf`, then loaded without undertow (BODY, ids); it returns ({case: checkpoint},
    {case: hf dir}, {case: transformers' results}). The test module assigns it to `exported` and has
    an `spm_path` fixture."""
    @pytest.fixture(scope="module")
    def exported(tmp_path_factory, spm_path):
        root = tmp_path_factory.mktemp("export")
        checkpoints, dirs = {}, {}
        for case in cases:
            checkpoints[case] = make(root / case / "ckpt", spm_path, case)
            dirs[case] = str(root / case / "hf")
            assert main(["convert", "to-hf", checkpoints[case], dirs[case]]) == 0
        return checkpoints, dirs, load_without_undertow(body, dirs, ids, root)
    return exported


def check_export_dir(hf_dir: str, theirs: dict, model_type: str, model_class: str) -> None:
    """config.json names the remote code (model_type, architectures, auto_map), both remote-code files
    were written, and transformers built `model_class` from them (theirs: load_without_undertow's out)."""
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["model_type"] == model_type and config["architectures"] == [model_class]
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_{model_type}.{model_class}"
    assert {f"modeling_{model_type}.py", f"configuration_{model_type}.py"} <= set(os.listdir(hf_dir))
    assert theirs["type"] == model_class
