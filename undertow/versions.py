"""The versions of undertow's dependencies installed here, for `undertow --version`, bug reports
and the top of the CI log. Reads package metadata only: nothing is imported."""

from __future__ import annotations

from importlib import metadata

from undertow import __version__

# runtime dependencies, then the optional ones (extras) that change what undertow can do
PACKAGES = ("torch", "triton", "numpy", "sentencepiece", "webdataset", "safetensors", "tensorboard", "pyarrow",
            "tqdm", "transformers", "deepspeed", "megatron-core", "flash-attn", "pytest")


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def report() -> str:
    """undertow's version, then one line per dependency ('-' where not installed)."""
    return "\n".join([f"undertow {__version__}"] + [f"  {name} {installed(name) or '-'}" for name in PACKAGES])
