"""Activation checkpointing and torch.compile change speed and memory, never the numbers (beyond rounding)."""

import pytest

from undertow.pretrain.trainer import Trainer
from tests.pretrain.helpers import tiny_config


def first_step(run_dir, **overrides):
    trainer = Trainer(tiny_config(run_dir, checkpoint__resume="none", **overrides))
    batch = next(iter(trainer.train_loader))
    loss, grad_norm, _ = trainer.train_step([batch])
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    names = [n for n, _ in trainer.model.named_parameters()]
    return loss, grad_norm, grads, names


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    loss, norm, grads, names = first_step(tmp_path / "plain")
    loss_ac, norm_ac, grads_ac, names_ac = first_step(tmp_path / "ac", training__activation_checkpointing=True)
    assert names == names_ac  # parameter names (checkpoint keys) unchanged
    assert loss_ac == loss and norm_ac == pytest.approx(norm, rel=1e-6)
    for n in grads:
        assert (grads[n] - grads_ac[n]).abs().max() <= 1e-6 * max(grads[n].abs().max().item(), 1e-12), n


def test_compile_gives_the_same_step(tmp_path):
    loss, norm, grads, names = first_step(tmp_path / "plain")
    loss_c, norm_c, grads_c, names_c = first_step(tmp_path / "compiled", training__compile=True)
    assert names == names_c
    assert loss_c == pytest.approx(loss, rel=1e-5) and norm_c == pytest.approx(norm, rel=1e-4)
    for n in grads:
        rel = ((grads[n] - grads_c[n]).norm() / grads[n].norm()).item()
        assert rel < 1e-4, (n, rel)
