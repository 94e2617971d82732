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


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
    """One trained run that end-to-end tests share when they only read it (metrics.jsonl,
    TensorBoard events, checkpoints): the tiny transformer, 300 steps on the embedded corpus, a
    validation at the end. Returns (run_dir, TrainResult). Never write into it."""
    from tests.pretrain.helpers import tiny_config
    from undertow.pretrain.trainer import train

    run_dir = tmp_path_factory.mktemp("trained-tiny")
    cfg = tiny_config(run_dir, training__steps=300, model__d_model=64, model__n_heads=4, model__n_kv_heads=2,
                      data__seq_len=64, training__micro_batch_size=8, optimizer__lr=6e-3, training__val_every=300,
                      checkpoint__every=300)
    return run_dir, train(cfg)
