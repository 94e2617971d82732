"""ParaRNN's cells, the spec: the sequential loop over time of the ParaGRU and ParaLSTM cells with
diagonal recurrences (Danieli et al. 2025, "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs
for Large Language Models", arXiv 2510.21450, section 4: the GRU and the coupled-input-forget LSTM
with peepholes).

The input projections u = B x + b are computed for all tokens at once, outside this op; the op
takes them per gate, `inputs` (B, T, 3, D), and solves only the recurrence. Per channel (every
product is elementwise; a_*, p_* are (D,) vectors):

ParaGRU, inputs[:, :, g] for g in (z, r, h), a = (a_z, a_r, a_h) (3, D), state h:
    z   = sigmoid(a_z * h + u_z)                          (G1)
    r   = sigmoid(a_r * h + u_r)                          (G2)
    h~  = tanh(a_h * (r * h) + u_h)                       (G3)
    h'  = z * h~ + (1 - z) * h                            (G4)

ParaLSTM, inputs[:, :, g] for g in (f, c, o), a = (a_f, a_c, a_o) (3, D), p = (p_f, p_o) (2, D),
state (c, h):
    f   = sigmoid(a_f * h + u_f + p_f * c)                (L1)
    c~  = tanh(a_c * h + u_c)                             (L2)
    c'  = f * c + (1 - f) * c~                            (L3)
    o   = sigmoid(a_o * h + u_o + p_o * c')               (L4)
    h'  = o * tanh(c')                                    (L5)

States travel as one tensor (..., S, D): S = 1 (h) for the GRU, S = 2 (c, h) for the LSTM; the
output is h, the state's last row. Where a document starts (doc_ids changes) the state before that
token is zero; the first token of a row continues from `initial_state`.
"""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import segment_starts

CELLS = ("gru", "lstm")
STATE_SIZE = {"gru": 1, "lstm": 2}  # S: the rows of the state tensor, (h,) or (c, h)


def gru_gates(h: torch.Tensor, u: torch.Tensor, a: torch.Tensor) -> tuple:
    """h (..., D), u (..., 3, D), a (3, D) -> (z, r, h~), each (..., D): eqs. G1-G3."""
    u_z, u_r, u_h = u.unbind(-2)
    a_z, a_r, a_h = a.unbind(0)
    z = torch.sigmoid(a_z * h + u_z)                      # G1
    r = torch.sigmoid(a_r * h + u_r)                      # G2
    h_tilde = torch.tanh(a_h * (r * h) + u_h)             # G3
    return z, r, h_tilde


def lstm_gates(c: torch.Tensor, h: torch.Tensor, u: torch.Tensor, a: torch.Tensor, p: torch.Tensor) -> tuple:
    """c, h (..., D), u (..., 3, D), a (3, D), p (2, D) -> (f, c~, c', o, tanh(c')), each (..., D):
    eqs. L1-L4 (h' = o * tanh(c') is L5)."""
    u_f, u_c, u_o = u.unbind(-2)
    a_f, a_c, a_o = a.unbind(0)
    p_f, p_o = p.unbind(0)
    f = torch.sigmoid(a_f * h + u_f + p_f * c)            # L1
    c_tilde = torch.tanh(a_c * h + u_c)                   # L2
    c_new = f * c + (1 - f) * c_tilde                     # L3
    o = torch.sigmoid(a_o * h + u_o + p_o * c_new)        # L4
    return f, c_tilde, c_new, o, torch.tanh(c_new)


def cell_step(cell: str, state: torch.Tensor, u: torch.Tensor, a: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """One step of `cell` for every leading index at once: state (..., S, D), u (..., 3, D) ->
    the next state (..., S, D). The loop below calls it per token; the Newton solver for all tokens."""
    if cell == "gru":
        h = state[..., 0, :]
        z, _, h_tilde = gru_gates(h, u, a)
        return (z * h_tilde + (1 - z) * h).unsqueeze(-2)   # G4
    _, _, c_new, o, tanh_c = lstm_gates(state[..., 0, :], state[..., 1, :], u, a, p)
    return torch.stack((c_new, o * tanh_c), -2)             # L5


def check_inputs(cell: str, inputs: torch.Tensor, a: torch.Tensor, p: torch.Tensor | None) -> None:
    """Refuses a cell, shape or parameter set the op cannot take, naming the value and what is valid."""
    if cell not in CELLS:
        raise ValueError(f"pararnn: cell {cell!r} is unknown; choose one of {CELLS}")
    if inputs.ndim != 4 or inputs.shape[2] != 3:
        raise ValueError(f"pararnn: inputs must be (B, T, 3, D) (the three gates' projections), got {tuple(inputs.shape)}")
    D = inputs.shape[3]
    if tuple(a.shape) != (3, D):
        raise ValueError(f"pararnn: a must be (3, {D}), got {tuple(a.shape)}")
    if cell == "lstm" and (p is None or tuple(p.shape) != (2, D)):
        raise ValueError(f"pararnn: the lstm cell needs p (2, {D}) (peepholes p_f, p_o), got {None if p is None else tuple(p.shape)}")
    if cell == "gru" and p is not None:
        raise ValueError("pararnn: the gru cell has no peepholes; pass p=None")


def state_tensor(cell: str, initial_state, B: int, D: int, device, dtype) -> torch.Tensor:
    """The public initial state (GRU: h (B, D); LSTM: (c, h) each (B, D); or None: zeros) as one
    (B, S, D) tensor in `dtype`."""
    if initial_state is None:
        return torch.zeros(B, STATE_SIZE[cell], D, device=device, dtype=dtype)
    rows = (initial_state,) if cell == "gru" else tuple(initial_state)
    return torch.stack([s.to(dtype) for s in rows], 1)


def public_state(cell: str, state: torch.Tensor):
    """(B, S, D) -> GRU: h (B, D); LSTM: (c, h), each (B, D)."""
    return state[:, 0] if cell == "gru" else (state[:, 0], state[:, 1])


def pararnn_reference(
    cell: str,
    inputs: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor | None = None,
    *,
    initial_state=None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """cell: "gru" or "lstm"; inputs: (B, T, 3, D) = B x + b per gate (GRU: z, r, h; LSTM: f, c, o);
    a: (3, D); p: (2, D) for the LSTM, None for the GRU; initial_state: GRU h (B, D), LSTM (c, h) each
    (B, D); doc_ids: (B, T). Computes in float64 when given float64, else float32.
    Returns h (B, T, D) in inputs' dtype [, final_state in the compute dtype: GRU h, LSTM (c, h)]."""
    check_inputs(cell, inputs, a, p)
    B, T, _, D = inputs.shape
    work = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    u, a_w = inputs.to(work), a.to(work)
    p_w = None if p is None else p.to(work)
    state = state_tensor(cell, initial_state, B, D, inputs.device, work)
    starts = segment_starts(doc_ids, (B, T), inputs.device)
    outputs = []
    for t in range(T):
        if doc_ids is not None:  # a document starts here: the state before its first token is zero
            state = state * (~starts[:, t]).to(work)[:, None, None]
        state = cell_step(cell, state, u[:, t], a_w, p_w)
        outputs.append(state[:, -1])
    y = torch.stack(outputs, 1).to(inputs.dtype)
    return (y, public_state(cell, state)) if return_final_state else y
