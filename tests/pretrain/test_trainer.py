import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from undertow.data_prep.stats import unigram_entropy
from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain import trainer as trainer_mod
from undertow.pretrain.loader import resolve_sources
from undertow.pretrain.trainer import Trainer, TrainingDiverged, train

from tests.pretrain.helpers import TINY, cli_args, read_losses, tiny_config
from undertow.pretrain.config import load_config


def test_loss_falls_below_unigram_entropy(trained_tiny_run):
    run_dir, result = trained_tiny_run
    cfg = tiny_config(run_dir)
    entropy = unigram_entropy(resolve_sources(cfg.data)[0])
    losses = read_losses(run_dir)
    assert losses[1] > entropy  # starts near log(vocab)
    tail = sum(losses[s] for s in range(291, 301)) / 10
    assert tail < entropy - 0.5, (tail, entropy)
    assert result.last_val_loss is not None and result.last_val_loss < entropy
    assert ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints")).endswith("step_00000300")


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    big = Trainer(tiny_config(tmp_path / "a", training__micro_batch_size=8, checkpoint__resume="none"))
    small = Trainer(tiny_config(tmp_path / "b", training__micro_batch_size=4, training__grad_accum_steps=2,
                                checkpoint__resume="none"))
    batch = next(iter(big.train_loader))
    halves = [{k: (v[:4] if k not in ("cu_seqlens", "max_seqlen") else None) for k, v in batch.items()},
              {k: (v[4:] if k not in ("cu_seqlens", "max_seqlen") else None) for k, v in batch.items()}]
    halves = [{k: v for k, v in h.items() if v is not None} for h in halves]
    batch = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
    loss_big, norm_big, _ = big.train_step([batch])
    loss_small, norm_small, _ = small.train_step(halves)
    assert loss_big == pytest.approx(loss_small, rel=1e-5)
    assert norm_big == pytest.approx(norm_small, rel=1e-4)


def test_nan_guard_skips_then_stops_without_saving_poisoned_weights(tmp_path, monkeypatch):
    real = trainer_mod.Trainer._loss_sum  # each forward's loss, fused or not
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss = real(self, batch)
        # step 3 is non-finite once (skipped, run goes on); from step 6 on every step is.
        return loss * float("nan") if calls["n"] == 3 or calls["n"] >= 6 else loss

    monkeypatch.setattr(trainer_mod.Trainer, "_loss_sum", poisoned)
    t = Trainer(tiny_config(tmp_path, training__steps=20, training__max_bad_steps=3))
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps") as e:
        t.fit()
    assert t.skipped_total == 4 and t.step == 8
    # the weights that gave steps 6-8 non-finite losses are never saved (checkpoint.every = 0: no good
    # checkpoint exists, so the run is to start over; tests/pretrain/test_nan_guard.py covers the rest)
    assert "no checkpoint holds weights from before it" in str(e.value) and "start over" in str(e.value)
    assert ckpt.latest_checkpoint(os.path.join(tmp_path, "checkpoints")) is None
    monkeypatch.setattr(trainer_mod.Trainer, "_loss_sum", real)
    assert Trainer(tiny_config(tmp_path, training__steps=20, training__max_bad_steps=3)).step == 0
    records = read_losses(tmp_path)
    assert records[3] is None and math.isfinite(records[4])  # metrics.jsonl writes NaN as null


def test_tensorboard_scalars_are_readable(trained_tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, result = trained_tiny_run
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_mem_gib",
                "val/loss", "val/perplexity"):
        assert tag in tags, tag
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(5, 301, 5))  # logging.every 5
    losses = read_losses(run_dir)
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([losses[s] for s in steps], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [300]
    assert acc.Scalars("val/loss")[0].value == pytest.approx(result.last_val_loss, rel=1e-6)


def run_cli(run_dir, *extra):
    cmd = [sys.executable, "-m", "undertow.cli", "pretrain", *cli_args(run_dir, **dict(extra))]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path, workers):
    common = (("training__steps", 60), ("checkpoint__every", 10), ("data__num_workers", workers),
              ("model__d_model", 64), ("data__seq_len", 64))
    ref = run_cli(tmp_path / "ref", *common)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    reference = read_losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 61))

    victim = run_cli(tmp_path / "run", *common)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(read_losses(tmp_path / "run")) >= 25:
            break
        assert victim.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(read_losses(tmp_path / "run"))
    assert 25 <= killed_at < 60, killed_at
    assert ckpt.latest_checkpoint(str(tmp_path / "run" / "checkpoints")) is not None

    resumed = run_cli(tmp_path / "run", *common)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    assert read_losses(tmp_path / "run") == reference  # bit-identical, every step


def test_init_from_takes_weights_and_model_config_with_fresh_optimizer(tmp_path):
    first = train(tiny_config(tmp_path / "a", training__steps=6, model__d_model=48))
    # The new run's recipe asks for another width: the checkpoint's model wins.
    t = Trainer(tiny_config(tmp_path / "b", training__steps=4, checkpoint__init_from=first.checkpoint))
    assert t.cfg.model.d_model == 48 and t.step == 0 and not t.optimizer.state
    source = Trainer(tiny_config(tmp_path / "a", training__steps=6, model__d_model=48))
    for (name, a), (_, b) in zip(t.model.state_dict().items(), source.model.state_dict().items()):
        assert torch.equal(a, b), name
    t.fit()
    assert ckpt.latest_checkpoint(str(tmp_path / "b" / "checkpoints")).endswith("step_00000004")
    # data tokenized with another tokenizer: refused before any model is built, naming both
    with pytest.raises(ValueError, match=r"tokenizer sha256 .* vocab 512, the data .* tokenized with sha256 .* vocab 1024"):
        Trainer(tiny_config(tmp_path / "c", checkpoint__init_from=first.checkpoint, data__embedded_vocab_size=1024))


@pytest.mark.parametrize("pattern", ["mM", "M*-"])
def test_recurrent_family_trains_and_resumes_exactly(tmp_path, pattern):
    """The trainer knows no family: a Mamba hybrid trains, checkpoints and resumes bit-identically."""
    shared = {k: v for k, v in TINY.items() if not k.startswith("model.")}
    model = {"model.layer_pattern": pattern, "model.d_model": 32, "model.d_state": 8, "model.headdim": 16,
             "model.chunk_size": 16, "model.n_heads": 2, "model.ffn_hidden": 48}

    def config(run_dir, **extra):
        values = {**shared, **model, "training.run_dir": str(run_dir), "training.steps": 6,
                  "checkpoint.every": 3, "checkpoint.keep_last": 2, **extra}
        return load_config("tiny-mamba2", {k: str(v) for k, v in values.items()})

    reference = train(config(tmp_path / "ref"))
    assert math.isfinite(reference.last_loss)
    step3 = ckpt.list_checkpoints(str(tmp_path / "ref" / "checkpoints"))[0][1]
    assert step3.endswith("step_00000003")
    train(config(tmp_path / "run", **{"checkpoint.resume": step3}))
    expected = {s: loss for s, loss in read_losses(tmp_path / "ref").items() if s > 3}
    assert read_losses(tmp_path / "run") == expected


def test_a_resumed_run_records_each_step_once(tmp_path):
    """Resuming from step 3 of a run that reached step 6: metrics.jsonl and TensorBoard hold steps
    4..6 once (the replayed ones replace the first run's), and the records stay strict JSON."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = dict(training__steps=6, checkpoint__every=3, checkpoint__keep_last=2, logging__every=1,
                  logging__tensorboard=True)
    train(tiny_config(tmp_path, **common))
    step3 = ckpt.list_checkpoints(str(tmp_path / "checkpoints"))[0][1]
    assert step3.endswith("step_00000003")
    first = read_losses(tmp_path)
    train(tiny_config(tmp_path, checkpoint__resume=step3, **common))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert read_losses(tmp_path) == first  # the replay is exact
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_rerunning_a_finished_run_says_so(tmp_path, capsys):
    from undertow.cli import main

    from .helpers import cli_args

    args = ["pretrain", *cli_args(tmp_path, **{"training.steps": 2, "schedule.warmup_steps": 1})]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("already finished at step 2") and "nothing to do" in out and "nan" not in out
