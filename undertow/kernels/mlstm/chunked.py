"""The mLSTM in chunkwise form, PyTorch (autograd gives every gradient, exactly: the forward is the
reference's function, only regrouped); fast on CPU.

The row is cut into chunks of L tokens. Per head and chunk c, with lf = logsigmoid(f~), the carried
state (C_c, n_c, m_c) from before the chunk and the within-chunk log weights
    D[t, s] = i~_s + sum_{s < r <= t} lf_r      (s <= t, same document; -inf otherwise)
    g_t     = sum_{r <= t in t's document, in the chunk} lf_r  (+ m_c if t's document is the carried one)
the reference's stabilizer unrolls to m_t = max(g_t, max_s D[t, s]) (a document start contributes
its zero state's m = 0 through g_t), and
    h_t = [carried_t exp(g_t - m_t) q_t^T C_c + sum_s exp(D[t, s] - m_t) (q_t . k_s) v_s] / (max(|den_t|, exp(-m_t)) + eps)
with den_t the same sums with n_c and 1 in place of C_c and v_s. The state after the chunk is row
e (the chunk's last token) of the same weights: m_{c+1} = m_e, C_{c+1} = carried_e exp(g_e - m_e) C_c +
sum_s exp(D[e, s] - m_e) k_s v_s^T. The only loop is over chunks, on (B, H) scalars (m and each
state's weights on the chunks before it); one product over chunks then forms every C (`_carry`).
Every exponent is <= 0: no overflow. D is summed per entry (a masked cumulative sum over the (L, L)
tile), not as a difference of two long running sums, so strong forget gates keep their precision.
On CPU the form is memory-bound: q's 1/sqrt(Dqk) and the 1/denominator go into per-token factors,
and products accumulate in place, to keep the (L, Dv)-sized passes few.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import no_autocast, segment_starts
from undertow.kernels.mlstm.native import native_mlstm
from undertow.kernels.mlstm.reference import State, check_inputs, compute_dtype


def _chunks(x: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    """x (B, T, H, ...) -> (B, H, nc, L, ...) contiguous in dtype, time zero-padded to nc * L."""
    B, T, H = x.shape[:3]
    nc = math.ceil(T / L)
    x = x.to(dtype)
    if nc * L > T:
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, 0, 0, nc * L - T))
    return x.view(B, nc, L, H, *x.shape[3:]).movedim(3, 1).contiguous()


def chunk_documents(doc_ids: torch.Tensor | None, B: int, T: int, L: int, device):
    """same (B or 1, 1, nc or 1, L, L) bool: s <= t and one document; carried (B, 1, nc, L) bool: the
    token is in the document carried into its chunk (the row's first document in chunk 0); start
    (B, 1, nc, L) int64: where the token's document starts in its chunk (0 if before it), or None
    without doc_ids (then every token is carried and `same` is the causal mask)."""
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    nc = math.ceil(T / L)
    if doc_ids is None:
        return causal, torch.ones(B, 1, nc, L, dtype=torch.bool, device=device), None
    seg = segment_starts(doc_ids, (B, T), device).cumsum(1)
    if nc * L > T:  # padding joins the last document: it comes after every real token
        seg = torch.cat([seg, seg[:, -1:].expand(B, nc * L - T)], dim=1)
    seg = seg.view(B, nc, L)
    seg_ref = torch.cat([seg[:, :1, 0], seg[:, :-1, -1]], dim=1)  # the segment of the token before each chunk
    same = (seg[..., :, None] == seg[..., None, :]) & causal
    first = torch.ones_like(seg, dtype=torch.bool)
    first[..., 1:] = seg[..., 1:] != seg[..., :-1]
    start = torch.where(first, torch.arange(L, device=device), 0).cummax(-1).values
    return same[:, None], (seg == seg_ref[..., None])[:, None], start[:, None]


def log_weights(log_f: torch.Tensor, i: torch.Tensor, same: torch.Tensor, start: torch.Tensor | None):
    """log_f, i: (B, H, nc, L); same, start: from `chunk_documents`. Returns D (B, H, nc, L, L) (-inf
    off the document's causal part) and base (B, H, nc, L) = g_t without the carried m_c."""
    L = log_f.shape[-1]
    after = torch.ones(L, L, dtype=torch.bool, device=log_f.device).tril(-1)  # r > s
    # X[t, s] = sum_{s < r <= t} lf_r: a cumulative sum down each column of lf_r masked to r > s
    X = torch.where(after, log_f[..., :, None], 0.0).cumsum(-2)
    D = (X + i[..., None, :]).masked_fill_(~same, float("-inf"))
    cum = log_f.cumsum(-1)  # base_t = sum of lf over [start_t, t]: short sums, only compared with m
    if start is None:
        return D, cum
    before = torch.take_along_dim(cum - log_f, start.expand_as(cum), dim=-1)  # cum at start_t - 1
    return D, cum - before


def _carry(kc, vc, D, base, carried, ends, state: State):
    """The chunk-to-chunk recurrence. kc (B, H, nc, L, Dqk), vc (B, H, nc, L, Dv); D, base, carried as
    in `log_weights`/`chunk_documents`; ends (nc,) the index of each chunk's last real token; state
    (C, n, m) before the row. Returns the states before each chunk and after the last token, stacked:
    C (B, H, nc + 1, Dqk, Dv), n (B, H, nc + 1, Dqk), m (B, H, nc + 1).

    Each state is a weighted sum of the initial state and the chunks' own states (sum_s exp(D[e, s] -
    top) k_s v_s^T, relative to top = max_s D[e, s]); the scalar loop computes m and those weights,
    one product over chunks then forms every state: no loop over (Dqk, Dv) tensors."""
    B, H, nc = kc.shape[:3]
    chunk_idx = torch.arange(nc, device=kc.device)
    D_end = D[:, :, chunk_idx, ends]  # (B, H, nc, L): the last token's row
    top = D_end.amax(-1)  # (B, H, nc)
    kw = kc * torch.exp(D_end - top[..., None])[..., None]
    base_end = base[:, :, chunk_idx, ends]
    carried_end = carried[:, :, chunk_idx, ends]  # (B, 1, nc)
    C0, n0, m = state
    # weights[..., j]: of the initial state (j = 0) and of chunk j - 1's own state, in the current state
    weights = F.pad(torch.ones_like(m)[..., None], (0, nc))
    one_hot = torch.eye(nc + 1, dtype=m.dtype, device=m.device)[1:]
    rows, ms = [weights], [m]
    for c in range(nc):
        keep = carried_end[..., c]
        g = torch.where(keep, base_end[..., c] + m, base_end[..., c])
        m = torch.maximum(g, top[..., c])
        decay = torch.where(keep, torch.exp(g - m), 0.0)
        weights = torch.addcmul(torch.exp(top[..., c] - m)[..., None] * one_hot[c], decay[..., None], weights)
        rows.append(weights)
        ms.append(m)
    W = torch.stack(rows, dim=2)  # (B, H, nc + 1, nc + 1)
    Dqk, Dv = kc.shape[-1], vc.shape[-1]
    flat = lambda x: x.reshape(B * H, *x.shape[2:])
    chunk_C = torch.matmul(kw.transpose(-1, -2), vc).view(B * H, nc, Dqk * Dv)  # each chunk's own C
    C = torch.bmm(flat(W[..., 1:]), chunk_C) if C0 is None else \
        (flat(W[..., :1]) * flat(C0.reshape(B, H, 1, -1))).baddbmm_(flat(W[..., 1:]), chunk_C)
    n = torch.matmul(W[..., 1:], kw.sum(-2))
    if n0 is not None:
        n = n + W[..., :1] * n0[:, :, None]
    return C.view(B, H, nc + 1, Dqk, Dv), n, torch.stack(ms, dim=2)


def mlstm_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: State | None = None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Same signature and results as `mlstm_reference` (see reference.py for shapes), plus `chunk_size`.
    Computes in float32 (float64 for float64 inputs) also inside a bf16 autocast region."""
    check_inputs(q, k, v, i, f, initial_state, doc_ids, chunk_size)
    with no_autocast(q.device):
        done = native_mlstm(q, k, v, i, f, eps, initial_state, doc_ids, return_final_state)
        if done is not None:  # CPU: the recurrence in C++ (native.py)
            return done
        return _mlstm_chunked(q, k, v, i, f, eps, chunk_size, initial_state, doc_ids, return_final_state)


def _mlstm_chunked(q, k, v, i, f, eps, chunk_size, initial_state, doc_ids, return_final_state):
    B, T, H, Dqk = q.shape
    Dv = v.shape[3]
    dtype = compute_dtype(q.dtype)
    L = min(chunk_size, T)
    qc = _chunks(q, L, dtype)  # (B, H, nc, L, Dqk); its scale 1/sqrt(Dqk) goes into the per-token factors
    kc = _chunks(k, L, dtype)
    vc = _chunks(v, L, dtype)
    log_f = _chunks(F.logsigmoid(f.to(dtype)), L, dtype)  # (B, H, nc, L)
    ic = _chunks(i, L, dtype)
    same, carried, start = chunk_documents(doc_ids, B, T, L, q.device)
    D, base = log_weights(log_f, ic, same, start)

    if initial_state is None:  # the zero state: C, n absent from every sum, m = 0
        state = (None, None, q.new_zeros(B, H, dtype=dtype))
    else:
        state = tuple(s.to(dtype) for s in initial_state)
    nc = qc.shape[2]
    ends = (torch.arange(1, nc + 1, device=q.device) * L).clamp(max=T) - 1 - torch.arange(nc, device=q.device) * L
    C_all, n_all, m_all = _carry(kc, vc, D, base, carried, ends, state)

    g = torch.where(carried, base + m_all[..., :-1, None], base)  # (B, H, nc, L)
    m = torch.maximum(g, D.amax(-1))  # the reference's m_t
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * (D - m[..., None]).exp_()  # (B, H, nc, L, L), q unscaled
    inter = torch.where(carried, torch.exp(g - m), 0.0)  # weight of the carried state
    denominator = (scores.sum(-1) + inter * torch.matmul(qc, n_all[:, :, :-1, :, None])[..., 0]) * Dqk ** -0.5
    scale = Dqk ** -0.5 / (torch.maximum(denominator.abs(), torch.exp(-m)) + eps)  # (B, H, nc, L)
    # h = scale * (scores @ v + inter * q C_in): the row scales go into the (L, L) and (L, Dqk) factors,
    # smaller than the (L, Dv) product, and the sum into the second product's accumulation
    flat = lambda x: x.reshape(-1, *x.shape[-2:])
    h = torch.bmm(flat(qc * (inter * scale)[..., None]), flat(C_all[:, :, :-1]))
    # out of place: the planner's meta run casts matmul operands to bf16 (autocast's rule), h with them
    h = torch.baddbmm(h, flat(scores * scale[..., None]), flat(vc)).view(B, H, nc * L, Dv)
    h = h.transpose(1, 2)[:, :T].to(q.dtype)
    final = (C_all[:, :, -1], n_all[:, :, -1], m_all[:, :, -1])
    return (h, final) if return_final_state else h
