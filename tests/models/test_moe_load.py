"""The router losses from the micro-batch's summed statistics (models/moe/balance.py) and the
per-expert load table a training run writes at its end (models/moe/load_table.py). The losses'
equality across layouts (the statistics summed over the dp/cp ranks) is the layout harness's moe
row (tests/distributed/layouts.py, aux_loss_coef 0.1)."""

import csv
import os

import pytest
import torch

from tests.pretrain.helpers import tiny_config
from undertow.kernels.moe.grouped import expert_counts
from undertow.models.moe.balance import balance_losses, token_stats
from undertow.models.moe.layer import route
from undertow.models.moe.load_table import load_table
from undertow.pretrain.trainer import Trainer


def test_losses_are_switch_and_z_of_the_whole_micro_batch_from_summed_parts():
    """One set of tokens, or its parts' statistics summed (what the all-reduce over ranks does):
    the same Switch loss E sum f_e P_e and z-loss mean(lse^2), and the same gradients of the logits."""
    torch.manual_seed(0)
    logits = (2 * torch.randn(37, 6, dtype=torch.float64)).requires_grad_()
    probs, idx, _ = route(logits, 2)
    balance, z, load, counts = balance_losses(logits, probs, idx)
    f = expert_counts(idx, 6).double() / idx.numel()
    torch.testing.assert_close(balance.double(), 6 * (f * probs.mean(0)).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(z.double(), torch.logsumexp(logits, -1).square().mean(), rtol=1e-6, atol=0)
    assert torch.equal(counts, expert_counts(idx, 6).double()) and load.sum().item() == pytest.approx(6.0)
    whole = torch.autograd.grad(balance + 0.1 * z, logits)[0]

    probs, idx, _ = route(logits, 2)  # a fresh graph
    parts = [slice(0, 10), slice(10, 37)]  # unequal token counts: a mean of means would not do
    stats = sum(token_stats(logits[p], probs[p], idx[p]) for p in parts)
    n = stats[-1]
    summed = 6 * (stats[7:13] / (n * 2) * stats[:6] / n).sum() + 0.1 * stats[6] / n
    torch.testing.assert_close(torch.autograd.grad(summed, logits)[0], whole.double(), rtol=1e-5, atol=1e-9)


def test_run_writes_the_expert_load_per_layer(tmp_path):
    """2 steps of 2 micro-batches with activation checkpointing: every training forward counted
    once (not the recomputation in the backward, not validation), each layer's fractions sum to 1."""
    run = tmp_path / "run"
    cfg = tiny_config(run, model__moe__n_experts=4, model__moe__top_k=2, model__moe__expert_hidden=16,
                      model__moe__router="rmoe", model__moe__router_dim=8, training__steps=2,
                      training__grad_accum_steps=2, training__micro_batch_size=2,
                      training__activation_checkpointing="true", training__val_every=1, training__val_batches=1,
                      checkpoint__resume="none")
    Trainer(cfg).fit()
    with open(os.path.join(run, "expert_load.csv")) as f:
        rows = list(csv.DictReader(f))
    layers = sorted({int(r["layer"]) for r in rows})
    assert layers == [0, 1]
    pairs = 2 * 2 * 2 * 32 * 2  # steps x micro-batches x rows x tokens x top-k
    for layer in layers:
        mine = [r for r in rows if int(r["layer"]) == layer]
        assert [int(r["expert"]) for r in mine] == [0, 1, 2, 3]
        assert sum(int(r["routed_pairs"]) for r in mine) == pairs
        assert sum(float(r["fraction"]) for r in mine) == pytest.approx(1.0, abs=1e-5)
    table = open(os.path.join(run, "expert_load.md")).read()
    assert "| expert | layer 0 | layer 1 |" in table and "entropy / log E" in table


def test_dense_run_writes_no_table(tmp_path):
    Trainer(tiny_config(tmp_path / "run", training__steps=1, checkpoint__resume="none")).fit()
    assert not os.path.exists(tmp_path / "run" / "expert_load.csv")


def test_load_table_shares():
    table = load_table({3: [1.0, 3.0], 5: [2.0, 2.0]})
    assert "| 1 | 75.00% | 50.00% |" in table
    assert "| max / (1/E) | 1.50 | 1.00 |" in table
