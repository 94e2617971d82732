"""Training FLOPs of a layer-pattern model, from its layers' forward FLOPs per token.

A family supplies forward(kind) -> forward FLOPs per token of one layer of that kind; training
counts forward + backward as 3x the forward (the backward's two matmuls per forward matmul), and
the LM head's matmul (6 d V: forward and backward) once at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def pattern_layer_costs(pattern: Iterable[str], forward: Callable[[str], float]) -> list[float]:
    """Training FLOPs per token of each layer, in order (what the pipeline split balances)."""
    return [3.0 * forward(kind) for kind in pattern]


def lm_training_flops(layer_costs: list[float], d_model: int, vocab_size: int) -> float:
    """Training FLOPs per token of the whole model: its layers and the LM head."""
    return sum(layer_costs) + 6.0 * d_model * vocab_size
