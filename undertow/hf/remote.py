"""Remote-code export: copy a family's self-contained transformers code into an HF directory.

    write_remote_code(remote, out_dir, config)   remote: models/hf_remote.py's RemoteCode

The two source files are read from our package as text (importlib.resources) and checked to
import nothing of undertow (what loads them may have no undertow installed); config.json gains
`auto_map`, `model_type` and `architectures` so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` builds the family's class.
"""

from __future__ import annotations

import ast
import importlib.resources
import os

from undertow.models.hf_common import HFConversionError
from undertow.models.hf_remote import RemoteCode


def remote_sources(remote: RemoteCode) -> dict[str, str]:
    """{file name: source text} of the family's remote code; HFConversionError if one is missing
    or imports undertow."""
    root = importlib.resources.files(remote.package)
    sources = {}
    for name in remote.files:
        path = root / name
        if not path.is_file():
            raise HFConversionError(f"{remote.package} has no {name}: the family's remote code is incomplete")
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(m == "undertow" or m.startswith("undertow.") for m in modules):
                raise HFConversionError(f"{remote.package}.{name[:-3]} imports undertow; remote code must be "
                                        "self-contained (torch and transformers only)")
        sources[name] = text
    return sources


def write_remote_code(remote: RemoteCode, out_dir: str, config: dict) -> None:
    """Write the source files into `out_dir` and point `config` (the config.json dict) at them."""
    for name, text in remote_sources(remote).items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    config["model_type"] = remote.name
    config["architectures"] = [remote.model_class]
    config["auto_map"] = remote.auto_map
