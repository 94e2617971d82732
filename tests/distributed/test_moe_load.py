"""The per-expert load table (models/moe/load_table.py) of a run under pipeline parallelism: each
stage holds one of the two MoE layers, rank 0 writes both, each with every routed pair of the run
counted once (the single-process test is tests/models/test_moe_load.py)."""

import csv
import os

from tests.distributed.harness import run_distributed
from tests.distributed.layouts import LAYOUTS, make_config
from undertow.pretrain.trainer import Trainer


def _fit(rank, world, run_dir):
    cfg = make_config("moe", run_dir, LAYOUTS["pp2"] + ["--training.steps", "2", "--checkpoint.resume", "none"])
    return Trainer(cfg).fit().steps


def test_pp2_run_writes_the_load_of_every_stage_layer(tmp_path):
    run_dir = str(tmp_path / "pp2")
    assert run_distributed(_fit, 2, run_dir, retry_crash=False) == [2, 2]
    with open(os.path.join(run_dir, "expert_load.csv")) as f:
        rows = list(csv.DictReader(f))
    pairs = 2 * 2 * 32 * 2  # steps x rows x tokens x top-k
    for layer in (0, 1):  # layer 0 on pp rank 0, layer 1 on pp rank 1
        mine = [r for r in rows if int(r["layer"]) == layer]
        assert len(mine) == 4 and sum(int(r["routed_pairs"]) for r in mine) == pairs
