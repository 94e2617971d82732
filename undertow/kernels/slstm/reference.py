"""sLSTM, the spec: the sequential loop of the xLSTM paper's scalar-memory cell (Beck et al. 2024,
"xLSTM: Extended Long Short-Term Memory", section 2.2, eqs. 8-17), exponential input gate,
log-space forget gate, stabilizer m, recurrent matrix R block-diagonal per head.

Per head h and step t, with y_{t-1} the previous output (a row vector of the head's Dh channels):

    raw_g   = gates_t[g] + y_{t-1} R[g, h]        g in (i, f, z, o)      eqs. 14-17 (W x_t + b is `gates`)
    m_t     = max(i~_t, m_{t-1} + logsigmoid(f~_t))                      eq. 15 (stabilizer, log space)
    i_t     = exp(i~_t - m_t)                                            eq. 16
    f_t     = exp(logsigmoid(f~_t) + m_{t-1} - m_t)                      eq. 17
    c_t     = f_t c_{t-1} + i_t tanh(z~_t)                               eq. 8
    n_t     = f_t n_{t-1} + i_t                                          eq. 9
    y_t     = sigmoid(o~_t) c_t / n_t                                    eqs. 10, 13

The state is (y, c, n, m), each (B, H, Dh); the zero state is all zeros (y/c/n/m = 0). c / n, and
so y, does not depend on the stabilizer: m only keeps exp() finite. Where a document starts (doc_ids
changes) the state before that token is the zero state; the first token of a row continues from
`initial_state`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts

GATES = ("i", "f", "z", "o")  # the order of `gates`' dim 2 and of R's dim 0


def slstm_cell(raw: torch.Tensor, state: tuple) -> tuple:
    """One step of eqs. 8-17 from the gate pre-activations raw (B, 4, H, Dh) (recurrent part
    included) and the state (y, c, n, m) -> the new state (y, c, n, m)."""
    _, c, n, m = state
    i_raw, f_raw, z_raw, o_raw = raw.unbind(1)
    log_f = F.logsigmoid(f_raw) + m                       # log of the unstabilized forget gate times exp(m)
    m_new = torch.maximum(i_raw, log_f)                   # eq. 15
    i_gate = torch.exp(i_raw - m_new)                     # eq. 16
    f_gate = torch.exp(log_f - m_new)                     # eq. 17
    c_new = f_gate * c + i_gate * torch.tanh(z_raw)       # eq. 8
    n_new = f_gate * n + i_gate                           # eq. 9
    y_new = torch.sigmoid(o_raw) * c_new / n_new          # eqs. 10, 13
    return y_new, c_new, n_new, m_new


def zero_state(B: int, H: int, Dh: int, device, dtype=torch.float32) -> tuple:
    return tuple(torch.zeros(B, H, Dh, device=device, dtype=dtype) for _ in range(4))


def slstm_reference(
    gates: torch.Tensor,
    R: torch.Tensor,
    *,
    initial_state: tuple | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """gates: (B, T, 4, H, Dh) = W x_t + b for (i, f, z, o); R: (4, H, Dh, Dh), raw_g += y R[g, h];
    initial_state: (y, c, n, m) each (B, H, Dh). Computes in float64 when given float64, else
    float32. Returns y (B, T, H, Dh) in gates' dtype [, final_state (y, c, n, m) float32]."""
    B, T, _, H, Dh = gates.shape
    work = torch.float64 if gates.dtype == torch.float64 else torch.float32
    g, Rw = gates.to(work), R.to(work)
    zero = zero_state(B, H, Dh, gates.device, work)
    state = zero if initial_state is None else tuple(s.to(work) for s in initial_state)
    starts = segment_starts(doc_ids, (B, T), gates.device)
    outputs = []
    for t in range(T):
        if doc_ids is not None:  # a document starts here: its rows begin from the zero state
            keep = (~starts[:, t]).to(work)[:, None, None]
            state = tuple(s * keep for s in state)
        recurrent = torch.einsum("bhk,ghkj->bghj", state[0], Rw)  # y_{t-1} R[g, h]
        state = slstm_cell(g[:, t] + recurrent, state)
        outputs.append(state[0])
    y = torch.stack(outputs, 1).to(gates.dtype)
    if return_final_state:
        return y, tuple(s.float() for s in state)
    return y
