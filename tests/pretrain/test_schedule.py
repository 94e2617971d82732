import pytest

from undertow.pretrain.config import ScheduleConfig
from undertow.pretrain.schedule import lr_multiplier


def test_warmup_then_cosine_to_floor():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    values = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert values[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    values = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert all(v == 1.0 for v in values[5:80])
    assert values[-1] == pytest.approx(0.0)
    diffs = [a - b for a, b in zip(values[80:], values[81:])]
    assert max(diffs) == pytest.approx(min(diffs))


def test_constant():
    cfg = ScheduleConfig(kind="constant", warmup_steps=0)
    assert {lr_multiplier(s, 50, cfg) for s in range(50)} == {1.0}
