"""The console's progress: step N/M, elapsed and ETA from the steps this process ran."""

from undertow.pretrain import metrics
from undertow.pretrain.metrics import StepClock


def test_step_clock_gives_elapsed_and_eta_of_the_steps_run(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    clock = StepClock(first_step=100, total=400)  # resumed at step 100
    assert clock.describe(100) == "100/400 (25%), 0:00 elapsed, ETA ?"
    now[0] += 90.0  # 30 steps in 90 s: 3 s a step, 270 to go
    assert clock.describe(130) == "130/400 (32%), 1:30 elapsed, ETA 13:30"
    now[0] += 3 * 3600
    assert clock.describe(400).endswith("3:01:30 elapsed, ETA 0:00")
