"""The NaN guard keeps good weights good: absurd settings refused at load, a step that blows the weights
up stops the run before anything is saved from them, the last good checkpoint is protected from pruning
and named with the command that resumes it, and metrics.jsonl stays strict JSON."""

import json
import logging
import os

import pytest
import torch

from undertow.configtools import ConfigError
from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain import trainer as trainer_mod
from undertow.pretrain.trainer import Trainer, TrainingDiverged, train

from tests.pretrain.helpers import tiny_config


@pytest.mark.parametrize("field, value, expected", [
    ("optimizer.lr", "inf", "optimizer.lr = inf"),
    ("optimizer.lr", "nan", "optimizer.lr = nan"),
    ("optimizer.lr", "0", "optimizer.lr = 0.0"),
    ("optimizer.lr", "1e6", "optimizer.lr = 1000000.0"),
    ("optimizer.weight_decay", "inf", "optimizer.weight_decay = inf"),
    ("optimizer.weight_decay", "2", "lr * weight_decay must be < 1"),
    ("optimizer.betas", "0.9,1.0", "optimizer.betas = [0.9, 1.0]"),
    ("optimizer.betas", "nan,0.95", "optimizer.betas = [nan, 0.95]"),
    ("optimizer.eps", "nan", "optimizer.eps = nan"),
    ("training.grad_clip", "inf", "training.grad_clip = inf"),
    ("training.grad_clip", "-1", "training.grad_clip = -1.0"),
    ("training.collective_timeout_s", "inf", "training.collective_timeout_s = inf"),
    ("training.max_param_growth", "1", "training.max_param_growth = 1.0"),
])
def test_nonfinite_or_absurd_settings_are_refused_at_load(tmp_path, field, value, expected):
    overrides = {field.replace(".", "__"): value}
    if field == "optimizer.weight_decay" and value == "2":
        overrides["optimizer__lr"] = "0.5"
    with pytest.raises(ConfigError, match="is invalid") as e:
        tiny_config(tmp_path, **overrides)
    assert expected in str(e.value)


def strict_records(run_dir) -> list[dict]:
    """metrics.jsonl read by a strict JSON parser (bare NaN / Infinity are refused)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_nonfinite_streak_protects_the_last_good_checkpoint_and_sets_poisoned_ones_aside(tmp_path, monkeypatch,
                                                                                         caplog):
    real = trainer_mod.Trainer._loss_sum  # each forward's loss, fused or not
    calls = {"n": 0}

    def poisoned(self, batch):  # the weights after step 4 give only non-finite losses
        calls["n"] += 1
        loss = real(self, batch)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(trainer_mod.Trainer, "_loss_sum", poisoned)
    root = os.path.join(tmp_path, "checkpoints")
    cfg = tiny_config(tmp_path, training__steps=20, training__max_bad_steps=3, checkpoint__every=1,
                      checkpoint__keep_last=1)
    t = Trainer(cfg)
    with caplog.at_level(logging.WARNING, "undertow.trainer"), pytest.raises(TrainingDiverged) as e:
        t.fit()
    good = os.path.join(root, "step_00000003")
    message = str(e.value)
    # step 4's checkpoint holds the weights steps 5-7 failed with: set aside, never resumed; step 3's
    # (the last whose weights gave a finite loss) kept despite keep_last = 1 and named with its command
    assert "3 consecutive non-finite steps" in message and "up to step 7" in message
    assert f"the last good checkpoint is {good}" in message
    assert f"--checkpoint.resume {good}" in message and "undertow pretrain" in message
    assert [p for _, p in ckpt.list_checkpoints(root)] == [good]
    assert os.path.isdir(os.path.join(root, "step_00000004.nonfinite"))
    # warnings, metrics and checkpoints number the bad steps alike (5, 6, 7), metrics as strict JSON
    warned = [r.getMessage().split(":")[0] for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert warned == ["step 5", "step 6", "step 7"]
    train_records = {r["step"]: r for r in strict_records(tmp_path) if r["kind"] == "train"}
    assert [s for s, r in train_records.items() if r["skipped"]] == [5, 6, 7]
    assert train_records[5]["loss"] is None and train_records[4]["loss"] > 0

    monkeypatch.setattr(trainer_mod.Trainer, "_loss_sum", real)
    expected = ckpt.read_meta(good)["step"]
    resumed = Trainer(tiny_config(tmp_path, training__steps=20, checkpoint__every=1, checkpoint__keep_last=1))
    assert resumed.step == expected == 3


def test_blowup_stops_before_saving_and_a_lower_lr_resumes_the_good_weights(tmp_path):
    root = os.path.join(tmp_path, "checkpoints")
    train(tiny_config(tmp_path, training__steps=4, checkpoint__every=2, checkpoint__keep_last=1))
    good = os.path.join(root, "step_00000004")
    good_weights = Trainer(tiny_config(tmp_path, training__steps=4)).model.state_dict()

    cfg = tiny_config(tmp_path, training__steps=20, checkpoint__every=1, checkpoint__keep_last=1)
    cfg.optimizer.lr = 1e6  # past load-time validation, as a blow-up from any cause would be
    t = Trainer(cfg)
    with pytest.raises(TrainingDiverged) as e:
        t.fit()
    message = str(e.value)
    # step 5's loss was finite, its update blew the weights up: stopped there, nothing saved from them
    assert "step 5 (lr" in message and "multiplied the parameter norm by" in message
    assert f"the last good checkpoint is {good}" in message and f"--checkpoint.resume {good}" in message
    assert [p for _, p in ckpt.list_checkpoints(root)] == [good]

    rerun = Trainer(tiny_config(tmp_path, training__steps=6, optimizer__lr="1e-3", checkpoint__every=1,
                                checkpoint__keep_last=1))
    assert rerun.step == 4
    for name, value in rerun.model.state_dict().items():
        assert torch.equal(value, good_weights[name]), name
    result = rerun.fit()
    assert result.skipped_steps == 0 and result.last_loss < 10


def test_a_step_that_makes_weights_nonfinite_stops_at_once(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):  # the third update writes a NaN into one weight
        out = real_step(self, *args, **kwargs)
        if self.state_dict()["state"][0]["step"] == 3:
            next(p for g in self.param_groups for p in g["params"]).data[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    t = Trainer(tiny_config(tmp_path, training__steps=20, checkpoint__every=2, checkpoint__keep_last=1))
    with pytest.raises(TrainingDiverged, match="step 3 .* made the parameters non-finite") as e:
        t.fit()
    good = os.path.join(tmp_path, "checkpoints", "step_00000002")
    assert f"the last good checkpoint is {good}" in str(e.value) and t.step == 3
    assert [p for _, p in ckpt.list_checkpoints(os.path.join(tmp_path, "checkpoints"))] == [good]
