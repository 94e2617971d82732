"""Titans under context parallelism in gloo process groups at cp = 2 and 4, against one process:
the memory kernel's serial state passing and whole MAC / MAG / MAL models (cp_titans.py)."""

import pytest

from tests.distributed import cp_titans
from tests.distributed.harness import run_distributed


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"cp{w}")
def results(request) -> list[dict]:
    return run_distributed(cp_titans.check, request.param)


def test_memory_kernel_matches_the_single_process_run(results):
    for rank, res in enumerate(results):
        assert "a cp slice of 6 tokens cuts a memory chunk of 4" in res["kernel"].pop("misuse")
        for name, r in res["kernel"].items():
            assert r["y"] < 1e-5 and r["final"] < 1e-5, (rank, name, r)
            assert max(r["grads"]) < 1e-5, (rank, name, r["grads"])


def test_models_match_the_single_process_run(results):
    for res in results:
        for name, r in res["models"].items():
            assert r["loss"] < 1e-5, (name, r["loss"])
            bad = {n: e for n, e in r["grads"].items() if not e < 1e-4}
            assert not bad, (name, bad)
            assert r["alone"] > 1e-2, (name, "slices run alone should differ", r["alone"])
