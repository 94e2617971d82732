"""sLSTM under context parallelism: its state after a slice is a nonlinear function of the state
before it (R acts on y inside the gates), so it has no affine StatePassing; it passes the state
serially, rank to rank (kernels/context.py's SerialPassing; the communication in
parallel/context_serial.py). State: (y, c, n, m), each (B, H, Dh)."""

from __future__ import annotations

from undertow.kernels.context import SerialPassing


def state_shapes(args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    """gates (B, T, 4, H, Dh) -> four (B, H, Dh)."""
    B, _, _, H, Dh = args[0].shape
    return [(B, H, Dh)] * 4


SERIAL_PASSING = SerialPassing(state_shapes)
