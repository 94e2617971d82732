"""Tensor parallelism of every xLSTM block kind (models/xlstm/plan.py) against one process, with and
without sequence parallelism: an `msM*-` hybrid (xLSTM-7B mLSTM, the paper's sLSTM and up-projection
mLSTM, attention, SwiGLU MLP) at tp=2, on rows with document boundaries and ignored labels. The loss
and every parameter gradient equal the single-process step's; every gradient is placed like its
parameter. The weights are perturbed from the initialization so that the sLSTM's recurrent R and
the zero-initialized gate weights carry gradient too. The layout harness (tests/distributed/
layouts.py, row `xlstm-paper`) takes the `s` and `M` blocks through the Trainer at tp2 and tp2 x pp2.
One spawn of 2 processes (35 s on 2 cores at load average 11)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed.harness import run_distributed
from tests.distributed.test_tensor_parallel import V, batch, build, compare, step
from undertow.models import registry
from undertow.models.xlstm.config import XLSTMConfig
from undertow.parallel.tensor import apply_tensor_parallel

PATTERN = "msM*-"
TOLERANCE = 1e-5  # ||tp - ref|| / ||ref|| in float32 (measured: <= 3.3e-6)


def config() -> XLSTMConfig:
    """4 heads in every block kind (2 per rank), 4-token mLSTM chunks inside the 16-token rows."""
    return XLSTMConfig(vocab_size=V, d_model=32, n_layers=len(PATTERN), layer_pattern=PATTERN, n_heads=4,
                       slstm_heads=4, up_heads=4, attn_heads=4, attn_kv_heads=4, chunk_size=4, ffn_proj_factor=1.5,
                       ffn_round_up_to_multiple_of=16)


def perturbed_model():
    model = build(config())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _cases(rank, world):
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))["tp"]
    results = {}
    for sequence_parallel in (True, False):
        ref = perturbed_model()
        model = copy.deepcopy(ref)
        data = batch()
        ref_loss = step(ref, data, 1)
        apply_tensor_parallel(model, mesh, registry.get("xlstm"), sequence_parallel)
        results[sequence_parallel] = compare(model, ref, step(model, data, 2), ref_loss)
    return results


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_cases, 2)


@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "no-sp"])
def test_every_xlstm_block_kind_splits_by_heads_like_one_process(runs, sequence_parallel):
    for per_rank in runs:
        result = per_rank[sequence_parallel]
        loss, ref_loss = result["loss"]
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert result["same_names"] and result["misplaced"] == []
        worst = max(result["grad_err"].items(), key=lambda item: item[1])
        assert worst[1] < TOLERANCE, worst
        # s and M split by head (their gate weights replicated: each rank reads its channels' columns)
        split = set(result["sharded"])
        assert {"layers.1.slstm.R", "layers.1.slstm.bias", "layers.2.mlstm.q.weight",
                "layers.2.mlstm.igate.bias"} <= split
        assert "layers.2.mlstm.igate.weight" not in split
