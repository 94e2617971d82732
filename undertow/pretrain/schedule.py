"""Learning-rate schedules as pure functions of the step (nothing to checkpoint but the step)."""

import math

from undertow.pretrain.config import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Factor applied to the peak lr at optimizer step `step` (0-based), in [0, 1].

    warmup: linear from 1/(warmup+1) to 1 over `warmup_steps`; then
    cosine:   half-cosine from 1 down to min_lr_ratio at the last step;
    wsd:      flat at 1, then linear down to min_lr_ratio over the last decay_fraction of steps;
    constant: flat at 1.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    last = max(total_steps - 1, 1)
    if cfg.kind == "cosine":
        span = max(last - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.kind == "wsd":
        decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
        decay_start = max(total_steps - decay_steps, cfg.warmup_steps)
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(last - decay_start, 1), 1.0)
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown schedule kind {cfg.kind!r}")
