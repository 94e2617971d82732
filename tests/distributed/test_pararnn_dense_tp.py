"""Tensor parallelism of ParaRNN layers with heads = 1 (a dense input projection B, one gated-norm
group over all channels): B split by output channel, the convolved channels all-gathered before
it, the norm's mean square all-reduced (models/pararnn/plan.py, dense_split.py). At tp = 2, with
and without sequence parallelism, a ParaGRU + ParaLSTM + attention + MLP model's loss and every
gradient equal the single-process step (documents inside the rows); B's shard holds the rank's
output channels of all three gates. One spawn of 2 processes. The Trainer-level case is the
`pararnn-dense` row of tests/distributed/layouts.py."""

from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed.harness import run_distributed
from tests.distributed.test_tensor_parallel import V, batch, build, check_matches_single_process, compare, step
from undertow.models import registry
from undertow.models.pararnn.config import ParaRNNConfig
from undertow.parallel.tensor import apply_tensor_parallel

CFG = dict(vocab_size=V, d_model=16, expand=2, layer_pattern="gl*-", heads=1, chunk_size=4, attn_heads=2,
           ffn_hidden=32, init_std=0.1)


def against_single_process(tp_mesh, sequence_parallel: bool) -> dict:
    cfg = ParaRNNConfig(**CFG)
    ref = build(cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # gate biases and recurrences away from their zero / small init
        for name, p in ref.named_parameters():
            if name.endswith(("cell_bias", ".a", ".p")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = copy.deepcopy(ref)
    data = batch()
    ref_loss = step(ref, data, 1)
    apply_tensor_parallel(model, tp_mesh, registry.get("pararnn"), sequence_parallel)
    result = compare(model, ref, step(model, data, tp_mesh.size()), ref_loss)
    weight = dict(model.named_parameters())["layers.0.mixer.cell_weight"]
    result["cell_weight"] = (tuple(weight.to_local().shape), [str(p) for p in weight.placements])
    rank = tp_mesh.get_local_rank()  # its output channels' rows of each of the three gates
    own = dict(ref.named_parameters())["layers.0.mixer.cell_weight"][:, :, 16 * rank:16 * (rank + 1)]
    result["own_rows"] = torch.equal(weight.to_local(), own)
    return result


def _cases(rank, world):
    tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))["tp"]
    return {sp: against_single_process(tp_mesh, sp) for sp in (True, False)}


def test_dense_input_projection_at_tp2_matches_single_process():
    runs = run_distributed(_cases, 2)
    for sp in (True, False):
        per_rank = [r[sp] for r in runs]
        for result in per_rank:
            check_matches_single_process(result, sp)
            assert result["cell_weight"] == ((1, 3, 16, 32), ["S(2)"])  # rows of every gate, all input channels
            assert result["own_rows"]
        assert len({r["loss"] for r in per_rank}) == 1
