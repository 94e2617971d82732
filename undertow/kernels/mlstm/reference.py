"""The mLSTM cell of xLSTM-7B (arXiv 2503.13427, eq. numbers of its mLSTM section), the spec: a
sequential loop over `mlstm_step`, in float32 (float64 for float64 inputs).

Per head, with q scaled by 1/sqrt(Dqk), i~ and f~ the gate pre-activations (soft-capped by the caller):
    m_t  = max(logsigmoid(f~_t) + m_{t-1}, i~_t)                       stabilizer
    f'_t = exp(logsigmoid(f~_t) + m_{t-1} - m_t);  i'_t = exp(i~_t - m_t)
    C_t  = f'_t C_{t-1} + i'_t k_t v_t^T                                C: (Dqk, Dv)
    n_t  = f'_t n_{t-1} + i'_t k_t                                      n: (Dqk,)
    h_t  = C_t^T q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps)

State convention (what transformers' native xLSTM does, so an exported model gives the same
logits): the zero state is (C, n, m) = (0, 0, 0), m = 0 and not -inf. C and n are stored scaled
by exp(-m); the "true" memory is exp(m) C. h depends on m only through eps (h = C_true^T q /
(max(|n_true^T q|, 1) + eps exp(m))), so m_0 = 0 vs -inf changes h at the eps level and changes
m itself (and the stored C, n) wherever m_0 + sum logsigmoid(f~) wins the max: the convention
must be transformers' for outputs and states to agree. A document start (doc_ids changes) resets
the state to that same zero state before its first token, as a fresh sequence in transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C (B, H, Dqk, Dv), n (B, H, Dqk), m (B, H)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (the dtype of the state and of every internal)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zero_state(B: int, H: int, Dqk: int, Dv: int, dtype: torch.dtype, device) -> State:
    """The state before a row's or a document's first token: C = 0, n = 0, m = 0."""
    return (torch.zeros(B, H, Dqk, Dv, dtype=dtype, device=device), torch.zeros(B, H, Dqk, dtype=dtype, device=device),
            torch.zeros(B, H, dtype=dtype, device=device))


def check_inputs(q, k, v, i, f, initial_state, doc_ids, chunk_size: int | None = None) -> None:
    """Raise ValueError naming the argument whose shape does not fit q: (B, T, H, Dqk)."""
    if q.ndim != 4:
        raise ValueError(f"q must be (B, T, H, Dqk), got shape {tuple(q.shape)}")
    B, T, H, Dqk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be (B={B}, T={T}, H={H}, Dv), got {tuple(v.shape)}")
    for name, tensor, shape in (("i", i, (B, T, H)), ("f", f, (B, T, H)), ("doc_ids", doc_ids, (B, T))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for q of shape {tuple(q.shape)}, got {tuple(tensor.shape)}")
    if initial_state is not None:
        shapes = ((B, H, Dqk, v.shape[3]), (B, H, Dqk), (B, H))
        if len(initial_state) != 3 or any(tuple(s.shape) != e for s, e in zip(initial_state, shapes)):
            got = [tuple(s.shape) for s in initial_state]
            raise ValueError(f"initial_state must be (C, n, m) of shapes {list(shapes)}, got {got}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def mlstm_step(q, k, v, i, f, state: State, *, eps: float = 1e-6) -> tuple[torch.Tensor, State]:
    """One token: q, k (B, H, Dqk) (q unscaled), v (B, H, Dv), i, f (B, H) pre-activations;
    state (C, n, m) as in the module docstring. Returns h (B, H, Dv) in q's dtype and the new state
    (in the state's dtype). The decoding step and the body of `mlstm_reference`."""
    C, n, m = state
    dtype, out_dtype = C.dtype, q.dtype
    q = q.to(dtype) * q.shape[-1] ** -0.5
    k, v, i = k.to(dtype), v.to(dtype), i.to(dtype)
    log_f = F.logsigmoid(f.to(dtype))
    m_new = torch.maximum(log_f + m, i)  # m_t = max(logsigmoid(f~_t) + m_{t-1}, i~_t)
    f_act = torch.exp(log_f + m - m_new)  # f'_t = exp(logsigmoid(f~_t) + m_{t-1} - m_t)
    i_act = torch.exp(i - m_new)  # i'_t = exp(i~_t - m_t)
    C = f_act[..., None, None] * C + i_act[..., None, None] * (k[..., :, None] * v[..., None, :])  # C_t
    n = f_act[..., None] * n + i_act[..., None] * k  # n_t = f' n_{t-1} + i' k_t
    numerator = torch.einsum("bhkv,bhk->bhv", C, q)  # C_t^T q_t
    denominator = torch.maximum((n * q).sum(-1).abs(), torch.exp(-m_new)) + eps  # max(|n_t^T q_t|, exp(-m_t)) + eps
    return (numerator / denominator[..., None]).to(out_dtype), (C, n, m_new)


def mlstm_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    eps: float = 1e-6,
    initial_state: State | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """q, k: (B, T, H, Dqk); v: (B, T, H, Dv); i, f: (B, T, H); initial_state: (C, n, m) of shapes
    (B, H, Dqk, Dv), (B, H, Dqk), (B, H); doc_ids: (B, T). Returns h (B, T, H, Dv) in q's dtype
    [, final_state (C, n, m) float32 (float64 for float64 inputs)]."""
    check_inputs(q, k, v, i, f, initial_state, doc_ids)
    B, T, H, Dqk = q.shape
    dtype = compute_dtype(q.dtype)
    zero = zero_state(B, H, Dqk, v.shape[3], dtype, q.device)
    state = tuple(s.to(dtype) for s in initial_state) if initial_state is not None else zero
    starts = segment_starts(doc_ids, (B, T), q.device)
    hs = []
    for t in range(T):
        reset = starts[:, t]  # a document starts at t: its first token sees the zero state
        state = tuple(torch.where(reset.view(-1, *[1] * (s.ndim - 1)), z, s) for s, z in zip(state, zero))
        h, state = mlstm_step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], state, eps=eps)
        hs.append(h)
    h = torch.stack(hs, dim=1).to(q.dtype)
    return (h, state) if return_final_state else h
