"""Which expert-parallel layouts run (parallel/expert_layout.py, checked before torch is imported):
ep divides dp_shard x cp, and dp_shard x cp divides the experts (each of those ranks stores
E / (dp_shard x cp) of them); the refusals name the valid values."""

import re
from types import SimpleNamespace

import pytest

from undertow.parallel.expert_layout import expert_count_problem, expert_layout_problem


def _dims(ep, dp_shard=1, cp=1, pp=1, tp=1):
    return SimpleNamespace(ep=ep, dp_shard=dp_shard, cp=cp, pp=pp, tp=tp)


@pytest.mark.parametrize("dims", [_dims(1), _dims(2, 2), _dims(2, 4), _dims(2, 2, cp=2), _dims(4, 2, cp=2),
                                  _dims(2, 2, pp=2), _dims(2, 2, tp=2), _dims(4, 8)])
def test_ep_dividing_dp_shard_x_cp_runs(dims):
    assert expert_layout_problem(dims) is None
    assert expert_count_problem(dims, 8) is None


@pytest.mark.parametrize("dims,message", [
    (_dims(3, 4), "ep must divide parallel.dp_shard = 4; valid ep: 1, 2, 4"),
    (_dims(4, 2, cp=3), "parallel.dp_shard x parallel.cp = 6; valid ep: 1, 2, 3, 6"),
    (_dims(2), r"valid ep: 1 \(or set --parallel.dp_shard 2\)"),
    (_dims(0), "must be an integer >= 1"),
])
def test_ep_not_dividing_dp_shard_x_cp_refused(dims, message):
    assert re.search(message, expert_layout_problem(dims) or "")


def test_dp_shard_x_cp_must_divide_the_experts():
    assert "make dp_shard x cp a divisor of 6" in expert_count_problem(_dims(2, 4), 6)
    assert "make dp_shard x cp a divisor of 6" in expert_count_problem(_dims(4, 4), 6)
    assert expert_count_problem(_dims(2, 2), 6) is None
    assert "no MoE layers" in expert_count_problem(_dims(2, 2), 0)
