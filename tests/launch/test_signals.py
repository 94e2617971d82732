"""Stop signals in the training loop (in this process): finish the step, checkpoint, exit 75, resume exactly."""

import os
import signal
import sys

import pytest
import torch.distributed as dist

from undertow.cli import main
from undertow.pretrain.signals import EXIT_REQUEUE, describe_call, traceback_frames
from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain import signals as signals_mod
from undertow.pretrain import trainer as trainer_mod

from tests.launch.helpers import TINY_ARGS, read_losses

SHORT = [*TINY_ARGS, "--training.steps", "12", "--checkpoint.every", "10"]


def pretrain(run_dir) -> int:
    return main(["pretrain", "tiny", *SHORT, "--training.run_dir", str(run_dir)])


@pytest.fixture(scope="module")
def short_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("short-reference")
    assert pretrain(run_dir) == 0
    return read_losses(run_dir)


def test_stop_signal_checkpoints_the_step_and_the_rerun_matches(tmp_path, monkeypatch, capsys, short_reference):
    """SIGUSR1 here; SIGTERM takes the same path (tests/launch/test_local.py sends it to one of two ranks)."""
    signum = signal.SIGUSR1

    real_step = trainer_mod.Trainer.train_step

    def step_then_signal(self, micro):
        if self.step == 4:  # arrives during step 5
            os.kill(os.getpid(), signum)
        return real_step(self, micro)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step_then_signal)
    previous = signal.getsignal(signum)
    assert pretrain(tmp_path / "run") == EXIT_REQUEUE
    assert signal.getsignal(signum) is previous  # the handler is gone with the loop
    err = capsys.readouterr().err
    assert f"stopped: {signal.Signals(signum).name} received: stopped after step 5" in err
    assert ckpt.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("step_00000005")
    assert max(read_losses(tmp_path / "run")) == 5

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)
    assert pretrain(tmp_path / "run") == 0
    assert read_losses(tmp_path / "run") == short_reference  # bit-identical, every step


def test_a_failed_collective_is_named_from_its_traceback():
    assert not dist.is_initialized()
    try:
        dist.all_reduce(__import__("torch").ones(1))
    except Exception:  # noqa: BLE001 - any error raised inside torch.distributed
        call = describe_call(traceback_frames(sys.exc_info()[2]))
    assert call is not None and call.startswith("all_reduce (called from ")
    assert "test_signals.py" in call
    assert describe_call(traceback_frames(None)) is None


def _ctrl_c_during_step_5(monkeypatch, times: int):
    """SIGINT to this process `times` times during step 5 (before its step, then after it)."""
    real_step = trainer_mod.Trainer.train_step

    def step_with_signals(self, micro):
        if self.step != 4:
            return real_step(self, micro)
        os.kill(os.getpid(), signal.SIGINT)
        result = real_step(self, micro)
        for _ in range(times - 1):
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step_with_signals)


def test_ctrl_c_checkpoints_like_sigterm_and_a_repeat_within_the_window_is_the_same_one(tmp_path, monkeypatch, capsys):
    """Issue 13, part 6: Ctrl-C is a stop signal; the copy torchrun forwards (ms later) is not a second one."""
    _ctrl_c_during_step_5(monkeypatch, times=2)
    previous = signal.getsignal(signal.SIGINT)
    assert pretrain(tmp_path / "run") == EXIT_REQUEUE
    assert signal.getsignal(signal.SIGINT) is previous
    assert "stopped: SIGINT received: stopped after step 5" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("step_00000005")


def test_a_second_ctrl_c_exits_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(signals_mod, "REPEAT_WINDOW_S", 0.0)  # the second one counts however soon it comes
    _ctrl_c_during_step_5(monkeypatch, times=2)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is previous
    assert ckpt.latest_checkpoint(str(tmp_path / "run" / "checkpoints")) is None  # no checkpoint was written
