"""Titans' memory in parallel chunks (the paper's section 3.2): the spec is reference.py with the same
`chunk_size` (gradients at the chunk-start weights); chunk size 1 is the token-by-token rule itself.

Within a chunk every inner gradient is taken at one base -- the weights W_p entering the chunk, or
M_0 for tokens of a document that starts inside it -- so all of them come from one batched forward
and backward of the memory network over the chunk's keys. A token's gradient of layer l is rank one,
grad W_l = a_l^T delta_l (a_l the layer's input, delta_l the loss's derivative at its output: the
backward is written out, so the outer autograd sees plain differentiable tensors and never a
per-token weight matrix (C x Din x Dout per chunk: what titans-pytorch's users report running out of
memory on).

Momentum and forgetting are linear in the gradients, so inside a chunk (positions t, s = 1..C)
    S_t = pe_t S_p - sum_s (A_e)_{ts} theta_s g_s                     eq. 10 unrolled
    W_t = cW_t W_p + cS_t S_p + c0_t M_0 - sum_s (A_w A_e)_{ts} theta_s g_s   eq. 13 unrolled
with A_e[t, s] = prod_{s<r<=t} eta_r, A_w[t, s] = prod_{s<r<=t} (1 - alpha_r) (zero across a document
start), pe, cW their products from the chunk entry, cS = A_w pe, c0 the restarts' M_0 terms. With
g_s = sum_j Omega_{sj} a_j^T delta_j (Omega: the rule's window and gates) the readout of any layer
input x_t at the token's own weights W_t is three matmuls against the chunk-entry weights and one
attention-like product: x_t W_t = cW_t x_t W_p + cS_t x_t S_p + c0_t x_t M_0 - sum_j P_tj (x_t . a_j) delta_j,
P = A_w A_e diag(theta) Omega. The chunk's last row of the same sums gives the state passed on.
`recompute=True` runs each chunk under activation checkpointing: between the forward and the backward
only the inputs, the chunk-boundary states and the gate-only coefficients (C numbers per token and
head, like a chunk-local attention's scores) are kept, and the backward recomputes one chunk at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from undertow.kernels.dispatch import no_autocast, segment_starts
from undertow.kernels.titans_memory.reference import check_inputs, compute_dtype, start_state
from undertow.kernels.titans_memory.rule import MemoryState, UpdateRule, Weights, clip_and_guard


def host_bool(t: torch.Tensor, meta: bool) -> bool:
    """bool(t) read on the host; `meta` on the meta device (the planner's profile), which has no values:
    the answer that does the most work, so the profile counts it."""
    return meta if t.device.type == "meta" else bool(t)


def segprod(log_x: torch.Tensor) -> torch.Tensor:
    """log_x (..., n) -> (..., n, n) in log_x's dtype: out[t, s] = prod_{s<r<=t} exp(log_x[r]) for t >= s,
    else 0. The cumulative sums are taken in float64 and split into a rounded part and its remainder, so
    the differences keep the precision of the difference itself (in float32 alone they would lose
    ~|sum| * 1e-7); a log of -1e4 (a document start) zeroes every product across it."""
    n = log_x.shape[-1]
    cs = log_x.double().cumsum(-1)
    hi = cs.to(log_x.dtype)
    lo = (cs - hi.double()).to(log_x.dtype)
    causal = torch.ones(n, n, dtype=torch.bool, device=log_x.device).tril()
    diff = hi[..., :, None] - hi[..., None, :]
    diff += lo[..., :, None] - lo[..., None, :]
    return diff.masked_fill_(~causal, float("-inf")).exp_()


def grad_factors(base: Weights, x: torch.Tensor, v: torch.Tensor, rule: UpdateRule):
    """Each token's inner gradient as rank-one factors: base W_l (B, H, Din, Dout) or (H, Din, Dout), keys
    x (B, H, N, Dk), values v (B, H, N, Dv) -> (a_l (B, H, N, Din_l), delta_l (B, H, N, Dout_l)) per layer,
    grad_{W_l} l(base; x_j, v_j) = a_lj^T delta_lj; clipped and NaN-guarded per token (rule.py)."""
    inputs, pre = [x], []
    h = x
    for w in base[:-1]:
        pre.append(h @ w)
        h = F.silu(pre[-1])
        inputs.append(h)
    out = h @ base[-1]
    if len(base) > 1:
        out = out + x  # the residual
    deltas = [rule.loss_grad(out, v)]
    for w, u in zip(reversed(base[1:]), reversed(pre)):  # backward through W_{l+1} and SiLU
        sig = torch.sigmoid(u)
        deltas.insert(0, (deltas[0] @ w.transpose(-1, -2)) * sig * (1 + u * (1 - sig)))
    if rule.max_grad_norm == 0 and host_bool(torch.isfinite(deltas[0].sum()), meta=True):
        return inputs, deltas  # no clipping, nothing to guard (a NaN or inf reaches the sum): no per-token norms
    sq_norm = sum(a.square().sum(-1) * d.square().sum(-1) for a, d in zip(inputs, deltas))  # ||a^T d||_F^2
    scale = clip_and_guard(sq_norm, rule.max_grad_norm)[..., None]
    keep = scale > 0
    guard = not host_bool(keep.all(), meta=False)
    if guard:  # the NaN guard: a product with 0 would keep the NaN
        deltas = [torch.where(keep, d, torch.zeros_like(d)) for d in deltas]
        inputs = [torch.where(keep, a, torch.zeros_like(a)) for a in inputs]
    if rule.max_grad_norm > 0 or guard:
        deltas = [d * scale for d in deltas]
    return inputs, deltas


def coefficients(th, et, al, gm, resets, seg, C: int, c: int):
    """The gate-only part of every chunk at once (it does not depend on the memory), over T padded to
    n chunks of C. th, et, al (B, H, T); gm (B, H, T + c - 1) and seg (B, 1, T + c - 1) (the window's
    carried slots first); resets (B, 1, T). Returns, per chunk (dim 2 of n): cW, cS, c0, pe (B, H, n, C),
    P (B, H, n, C, N') and R (B, H, n, N'), the row of A_e diag(theta) Omega of each chunk's last
    token (its final momentum's sums), and for c = 1 `from_prev` (B, 1, n, C): 1 where the token's
    gradient is taken at W_p, 0 where at M_0 (None for c > 1). N' = N, except for c > 1 where a document
    starts: 2N (a window token's gradient at W_p, then at M_0, as the window's owner needs)."""
    B, H, T = th.shape
    n = -(-T // C)
    pad = n * C - T
    dtype = th.dtype
    chunks = lambda x: F.pad(x, (0, pad)).unflatten(-1, (n, C))  # noqa: E731  (..., n, C)
    windows = lambda x: F.pad(x, (0, pad)).unfold(-1, C + c - 1, C)  # noqa: E731  (..., n, N)
    th, et, al, reset = chunks(th), chunks(et), chunks(al), chunks(resets.to(dtype))
    seg = torch.cat([seg, seg[..., -1:].expand(*seg.shape[:-1], pad)], -1)  # padding: the last document
    seg_tok = seg[..., c - 1:].unflatten(-1, (n, C))
    seg_ext = seg.unfold(-1, C + c - 1, C)
    gm_ext = windows(gm)
    entry = seg_tok[..., 0] - reset[..., 0].long()  # (B, 1, n): the document of the state entering each chunk
    same = lambda a, b: (a[..., :, None] == b[..., None, :]).to(dtype)  # noqa: E731
    logs = torch.stack([et, 1 - al]).clamp_min(torch.finfo(dtype).tiny).log()  # (2, B, H, n, C)
    logs = logs.masked_fill(reset.bool(), -1e4)  # nothing carries across a document start
    docs = host_bool(reset.any(), meta=True)  # a document starts somewhere: M_0 terms
    Ae1, Aw1 = segprod(F.pad(logs, (1, 0))).unbind(0)  # position 0 (the entering state) gets log 1
    pe, Ae = Ae1[..., 1:, 0], Ae1[..., 1:, 1:].contiguous()  # contiguous once: every bmm would copy a slice
    cW, Aw = Aw1[..., 1:, 0], Aw1[..., 1:, 1:].contiguous()
    cS, c0 = (Aw @ torch.stack([pe, (1 - al) * reset], -1)).unbind(-1)
    Q = Aw @ Ae
    from_prev = (seg_tok == entry[..., None]).to(dtype)  # (B, 1, n, C): the token's base is W_p, else M_0
    last_rows = torch.full((n,), C - 1, device=th.device)
    last_rows[-1] = (T - 1) % C
    Ae_last = Ae[:, :, torch.arange(n, device=th.device), last_rows]  # (B, H, n, C): each chunk's last token's row
    if c == 1:  # Omega is diagonal: theta_t gamma_t on the chunk's own tokens, each at its own base
        omega = th * gm_ext
        return cW, cS, c0, pe, Q * omega[..., None, :], Ae_last * omega, from_prev
    else:
        t_idx = torch.arange(C, device=th.device)
        j_idx = torch.arange(C + c - 1, device=th.device)
        band = ((j_idx[None, :] >= t_idx[:, None]) & (j_idx[None, :] <= t_idx[:, None] + c - 1)).to(dtype)
        omega = th[..., None] * band * same(seg_tok, seg_ext) * gm_ext[..., None, :]  # (B, H, n, C, N)
        if docs:
            omega = torch.cat([omega * from_prev[..., None], omega * (1 - from_prev[..., None])], -1)
        P, R = Q @ omega, (Ae_last[..., None, :] @ omega)[..., 0, :]
    return cW, cS, c0, pe, P, R, None


def _chunk(W, S, W0, q, k_ext, v_ext, cW, cS, c0, pe, P, R, M1, from_prev, row: int, rule, has_docs: bool):
    """One chunk: W, S the entering weights/momentum (B, H, Din, Dout); q (B, H, C, Dk); k_ext, v_ext
    (B, H, N, D) its window tokens; cW, cS, c0, pe (B, H, C), P (B, H, C, N'), R (B, H, N'): the
    chunk's coefficients (`coefficients`; R the momentum row of its last real token, `row`); M1 =
    P * (q k_ext^T) (B, H, C, N'), the first layer's readout weights (state-free, so batched outside);
    from_prev (B, 1, C) or None (`coefficients`).
    has_docs: a document starts in the chunk (else its M_0 terms are zero and skipped).
    Returns y (B, H, C, Dv) and the state after the chunk's token `row`."""
    N = k_ext.shape[2]
    a_all, d_all = grad_factors(W, k_ext, v_ext, rule)
    if has_docs:  # the same tokens' gradients at M_0, for tokens of a document that starts in the chunk
        a0, d0 = grad_factors(W0, k_ext, v_ext, rule)
        if from_prev is not None:  # c = 1: each token at its own base
            pick = from_prev[..., None] > 0
            a_all = [torch.where(pick, x, y) for x, y in zip(a_all, a0)]
            d_all = [torch.where(pick, x, y) for x, y in zip(d_all, d0)]
        else:
            a_all = [torch.cat([x, y], 2) for x, y in zip(a_all, a0)]
            d_all = [torch.cat([x, y], 2) for x, y in zip(d_all, d0)]
    else:  # (no-op unless documents start in other chunks)
        P, R, M1 = P[..., :N], R[..., :N], M1[..., :N]
    h = q
    for layer, (w, s, w0, a, d) in enumerate(zip(W, S, W0, a_all, d_all)):
        hw, hs = (h @ torch.cat([w, s], -1)).split(w.shape[-1], -1)  # one matmul for both
        mix = M1 if layer == 0 else P * (h @ a.transpose(-1, -2))  # P_tj (x_t . a_j)
        u = cW[..., None] * hw + cS[..., None] * hs - mix @ d
        if has_docs:
            u = u + c0[..., None] * (h @ w0)
        h = F.silu(u) if layer < len(W) - 1 else u
    y = h + q if len(W) > 1 else h
    last = lambda x: x[..., row, None, None]  # noqa: E731
    W_new, S_new = [], []
    for w, s, w0, a, d in zip(W, S, W0, a_all, d_all):  # the last token's gradient sums in one matmul
        dw, ds = (a.transpose(-1, -2) @ torch.cat([P[..., row, :, None] * d, R[..., :, None] * d], -1)).split(
            d.shape[-1], -1)
        W_new.append(last(cW) * w + last(cS) * s - dw + (last(c0) * w0 if has_docs else 0))
        S_new.append(last(pe) * s - ds)
    return (y, *W_new, *S_new)


def titans_memory_chunked(q, k, v, theta, eta, alpha, init_weights: Weights, *, gamma=None,
                          rule: UpdateRule = UpdateRule(), chunk_size: int = 64,
                          initial_state: MemoryState | None = None, doc_ids=None, return_final_state=False,
                          recompute: bool = False):
    """Same arguments and results as reference.titans_memory_reference with chunk_size = C (module
    docstring); recompute: checkpoint each chunk (memory flat in T beyond the boundary states)."""
    check_inputs(q, k, v, theta, eta, alpha, init_weights, gamma, rule, initial_state, doc_ids, chunk_size)
    with no_autocast(q.device):
        return _run(q, k, v, theta, eta, alpha, init_weights, gamma, rule, chunk_size, initial_state, doc_ids,
                    return_final_state, recompute)


def _run(q, k, v, theta, eta, alpha, init_weights, gamma, rule, C, initial_state, doc_ids, return_final_state,
         recompute):
    B, T, H, _ = q.shape
    dtype, out_dtype = compute_dtype(q.dtype), q.dtype
    L, c = len(init_weights), rule.window
    state = start_state(init_weights, B, k, v, rule, dtype) if initial_state is None else initial_state
    W = tuple(w.to(dtype) for w in state.weights)
    S = tuple(s.to(dtype) for s in state.momentum)
    W0 = tuple(w.to(dtype) for w in init_weights)
    bh = lambda x: x.to(dtype).transpose(1, 2).contiguous()  # noqa: E731  (B, T, H, ...) -> (B, H, T, ...)
    qh, kh, vh = bh(q), bh(k), bh(v)
    th, (et, al) = bh(theta), (bh(x) for x in rule.gates(eta, alpha))
    gm = torch.ones_like(th) if gamma is None else bh(gamma)
    if c > 1:  # the window's carried tokens come first
        kh, vh, gm = (torch.cat([bh(x), y], 2) for x, y in zip(state.window, (kh, vh, gm)))
    starts = segment_starts(doc_ids, (B, T), q.device)
    seg = torch.cat([starts.new_zeros(B, c - 1, dtype=torch.long), starts.long().cumsum(1)], 1)[:, None]  # document no.
    if T == 0:
        y = qh.new_zeros(B, 0, H, v.shape[3], dtype=out_dtype)
        return (y, MemoryState(W, S, state.window)) if return_final_state else y
    cW, cS, c0, pe, P, R, from_prev = coefficients(th, et, al, gm, starts[:, None], seg, C, c)
    pad = cW.shape[2] * C - T
    qp, kp, vp = (F.pad(x, (0, 0, 0, pad)) if pad else x for x in (qh, kh, vh))  # whole chunks
    qk = qp.unflatten(2, (-1, C)) @ kp.unfold(2, C + c - 1, C)  # (B, H, n, C, N): q_t . k_j in each chunk
    M1 = P * (qk if P.shape[-1] == qk.shape[-1] else torch.cat([qk, qk], -1))
    ys = []
    for i, s0 in enumerate(range(0, T, C)):
        row = min(C, T - s0) - 1  # the chunk's last real token (the last chunk may be short)
        args = (qp[:, :, s0:s0 + C], kp[:, :, s0:s0 + C + c - 1], vp[:, :, s0:s0 + C + c - 1], cW[:, :, i],
                cS[:, :, i], c0[:, :, i], pe[:, :, i], P[:, :, i], R[:, :, i], M1[:, :, i],
                None if from_prev is None else from_prev[:, :, i])
        has_docs = host_bool(starts[:, s0:s0 + C].any(), meta=True)  # a document starts in the chunk: M_0 terms
        fn = lambda W, S, *a, row=row, has_docs=has_docs: _chunk(W, S, W0, *a, row, rule, has_docs)  # noqa: E731
        if recompute and torch.is_grad_enabled():
            out = checkpoint(lambda *x, fn=fn: fn(x[:L], x[L:2 * L], *x[2 * L:]), *W, *S, *args, use_reentrant=False)
        else:
            out = fn(W, S, *args)
        ys.append(out[0][:, :, :row + 1])
        W, S = tuple(out[1:1 + L]), tuple(out[1 + L:])
    y = (torch.cat(ys, 2) if ys else qh.new_zeros(B, H, 0, v.shape[3])).transpose(1, 2).to(out_dtype)
    if not return_final_state:
        return y
    window = None
    if c > 1:
        live = (seg == seg[..., -1:]).to(dtype)[:, 0]  # (B, T+c-1): the last document's slots
        window = tuple(x.transpose(1, 2)[:, -(c - 1):] for x in (kh, vh, gm * live[:, None]))
    return y, MemoryState(W, S, window)
