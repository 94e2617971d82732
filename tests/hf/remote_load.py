"""Load exported remote-code directories with transformers in a process where undertow cannot be
imported (`python -I -S`: no PYTHONPATH, no user site, no .pth files, so not undertow's editable
finder; only the standard library and the environment's site-packages, torch and transformers).

    results = load_without_undertow(BODY, {case: hf_dir}, ids, tmp_path)

BODY is Python run once per directory with `model` (AutoModelForCausalLM, trust_remote_code, eval,
under no_grad), `ids` (the tensor passed in) and `out` (a dict to fill); returns {case: out}.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap

import torch

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
