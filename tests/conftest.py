import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; Triton reads this when a kernel module is first
    # imported, and any test module may import the kernels (through a model) before tests/kernels/.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test (and every subprocess it starts) prepares the embedded corpus into one temp cache."""
    cache = str(tmp_path_factory.mktemp("undertow-cache"))
    old = os.environ.get("UNDERTOW_CACHE")
    os.environ["UNDERTOW_CACHE"] = cache
    yield cache
    if old is None:
        os.environ.pop("UNDERTOW_CACHE", None)
    else:
        os.environ["UNDERTOW_CACHE"] = old
