"""Titans' neural long-term memory (Behrouz et al. 2025, arXiv 2501.00663), the spec: a token-by-token
loop, in float32 (float64 for float64 inputs). Equation numbers are the Titans paper's.

Per head, with k_t, v_t, q_t given (the caller projects and normalises them) and the data-dependent
gates theta_t (inner learning rate, already scaled by its max), eta_t (momentum), alpha_t (forgetting):
    l(W; k, v)  = ||M_W(k) - v||^2                                  eq. 12 (or the rule's Huber loss)
    g_t         = grad_W l(W_base; k_t, v_t)                        eq. 8's gradient (Omega: a window, rule.py)
    S_t         = eta_t S_{t-1} - theta_t g_t                       eq. 10 (surprise with momentum)
    W_t         = (1 - alpha_t) W_{t-1} + S_t                       eq. 13 (forgetting)
    y_t         = M_{W_t}(q_t)                                      eq. 15 (retrieval, no update)
W_base is W_{t-1} token by token (`chunk_size=None`). With `chunk_size=C` it is the weights at the
start of t's chunk -- the paper's mini-batch gradient descent (section 3.2, "parallelizing the
long-term memory"), which chunked.py computes in parallel -- or, when t's document started inside
the chunk, the document's initial weights: the spec of the chunked form at chunk size C. The
inner gradient is taken by autograd (create_graph, so the outer backward sees through it): this
file does not depend on chunked.py's hand-written derivative.

Documents: where doc_ids changes the memory restarts from `init_weights` (the learned M_0 of each
head) with zero momentum and an empty Omega window; a row starts from `initial_state` (default: the
same restart state).
"""

from __future__ import annotations

import torch

from undertow.kernels.dispatch import segment_starts
from undertow.kernels.titans_memory.rule import (MemoryState, UpdateRule, Weights, check_weights, clip_and_guard,
                                                 memory_forward)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def start_state(init_weights: Weights, B: int, k: torch.Tensor, v: torch.Tensor, rule: UpdateRule,
                dtype: torch.dtype) -> MemoryState:
    """The state a row or a document starts from: the heads' initial weights (H, Din, Dout) broadcast to
    (B, H, Din, Dout), zero momentum, an empty window (gamma 0)."""
    weights = tuple(w.to(dtype).expand(B, *w.shape) for w in init_weights)
    momentum = tuple(torch.zeros_like(w) for w in weights)
    window = None
    if rule.window > 1:
        H = k.shape[2]
        window = (k.new_zeros(B, rule.window - 1, H, k.shape[3], dtype=dtype),
                  v.new_zeros(B, rule.window - 1, H, v.shape[3], dtype=dtype),
                  k.new_zeros(B, rule.window - 1, H, dtype=dtype))
    return MemoryState(weights, momentum, window)


def check_inputs(q, k, v, theta, eta, alpha, init_weights, gamma, rule, initial_state, doc_ids, chunk_size) -> None:
    """Raise ValueError naming the argument whose shape does not fit q: (B, T, H, Dk)."""
    if q.ndim != 4:
        raise ValueError(f"q must be (B, T, H, Dk), got shape {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be (B={B}, T={T}, H={H}, Dv), got {tuple(v.shape)}")
    for name, t, shape in (("theta", theta, (B, T, H)), ("eta", eta, (B, T, H)), ("alpha", alpha, (B, T, H)),
                           ("gamma", gamma, (B, T, H)), ("doc_ids", doc_ids, (B, T))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for q of shape {tuple(q.shape)}, got {tuple(t.shape)}")
    check_weights(tuple(init_weights), Dk, v.shape[3], "init_weights")
    if any(w.ndim != 3 or w.shape[0] != H for w in init_weights):
        raise ValueError(f"init_weights must be (H={H}, Din, Dout) each, got {[tuple(w.shape) for w in init_weights]}")
    if initial_state is not None:
        expect = [(B, H, *w.shape[1:]) for w in init_weights]
        for name, ws in (("weights", initial_state.weights), ("momentum", initial_state.momentum)):
            if [tuple(w.shape) for w in ws] != expect:
                raise ValueError(f"initial_state.{name} must have shapes {expect}, got {[tuple(w.shape) for w in ws]}")
        if (initial_state.window is None) != (rule.window == 1):
            raise ValueError(f"initial_state.window must be given exactly when rule.window > 1 (= {rule.window})")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def token_grad(base: Weights, k: torch.Tensor, v: torch.Tensor, rule: UpdateRule) -> Weights:
    """grad_W l(base; k, v) per row and head, k (B, H, Dk), v (B, H, Dv) -> like `base`, clipped to
    rule.max_grad_norm and zero where not finite (rule.py). Autograd, differentiable again."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        ws = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in base)
        loss = rule.loss_value(memory_forward(ws, k[:, :, None]), v[:, :, None]).sum()
        grads = torch.autograd.grad(loss, ws, create_graph=outer)
    sq_norm = sum(g.square().sum((-2, -1)) for g in grads)  # (B, H)
    scale = clip_and_guard(sq_norm, rule.max_grad_norm)[..., None, None]
    return tuple(torch.where(scale > 0, g * scale, torch.zeros_like(g)) for g in grads)


def _where(mask: torch.Tensor, a: Weights, b: Weights) -> Weights:
    """Per row (mask (B,)): a where True, else b."""
    return tuple(torch.where(mask.view(-1, *[1] * (x.ndim - 1)), x, y) for x, y in zip(a, b))


def titans_memory_reference(q, k, v, theta, eta, alpha, init_weights: Weights, *, gamma=None,
                            rule: UpdateRule = UpdateRule(), chunk_size: int | None = None,
                            initial_state: MemoryState | None = None, doc_ids=None, return_final_state=False):
    """q, k (B, T, H, Dk); v (B, T, H, Dv); theta, eta, alpha, gamma (B, T, H) in [0, 1] (gamma: the
    Omega rule's token gates, None = 1); init_weights: W_1..W_L of shapes (H, Din_l, Dout_l).
    chunk_size: None for the exact token-by-token rule, C for the chunk-start rule (module docstring).
    Returns y (B, T, H, Dv) in q's dtype [, final MemoryState]."""
    check_inputs(q, k, v, theta, eta, alpha, init_weights, gamma, rule, initial_state, doc_ids, chunk_size)
    B, T, H, _ = q.shape
    dtype, out_dtype = compute_dtype(q.dtype), q.dtype
    q, k, v, theta = (t.to(dtype) for t in (q, k, v, theta))
    eta, alpha = rule.gates(eta.to(dtype), alpha.to(dtype))
    gamma = torch.ones_like(theta) if gamma is None else gamma.to(dtype)
    fresh = start_state(init_weights, B, k, v, rule, dtype)
    state = fresh if initial_state is None else MemoryState(
        tuple(w.to(dtype) for w in initial_state.weights), tuple(s.to(dtype) for s in initial_state.momentum),
        None if initial_state.window is None else tuple(x.to(dtype) for x in initial_state.window))
    W, S = state.weights, state.momentum
    c = rule.window
    if c > 1:  # the window's tokens: the carried c - 1, then the row's own
        k_all, v_all = torch.cat([state.window[0], k], 1), torch.cat([state.window[1], v], 1)
        g_all = torch.cat([state.window[2], gamma], 1)
    else:
        k_all, v_all, g_all = k, v, gamma
    starts = segment_starts(doc_ids, (B, T), q.device)
    first = torch.zeros(B, dtype=torch.long, device=q.device) - (c - 1)  # first window slot of the document
    base, ys = W, []
    for t in range(T):
        reset = starts[:, t]
        W, S = _where(reset, fresh.weights, W), _where(reset, fresh.momentum, S)
        first = torch.where(reset, torch.full_like(first, t), first)
        if chunk_size is None or t % chunk_size == 0:
            base = W
        else:  # a document starting inside the chunk takes its gradients at its initial weights
            base = _where(reset, W, base)
        g = tuple(torch.zeros_like(w) for w in W)
        for j in range(t - c + 1, t + 1):  # the Omega window (c = 1: the token itself)
            slot = j + c - 1  # index into the *_all tensors
            gj = token_grad(base, k_all[:, slot], v_all[:, slot], rule)
            weight = g_all[:, slot] * (j >= first)[:, None].to(dtype)  # (B, H): the token's gate, same document
            g = tuple(a + weight[..., None, None] * b for a, b in zip(g, gj))
        th, et, al = (x[:, t, :, None, None] for x in (theta, eta, alpha))
        S = tuple(et * s - th * gl for s, gl in zip(S, g))  # eq. 10
        W = tuple((1 - al) * w + s for w, s in zip(W, S))  # eq. 13
        ys.append(memory_forward(W, q[:, t, :, None])[:, :, 0])  # eq. 15: y_t = M_t(q_t)
    y = torch.stack(ys, 1).to(out_dtype) if T else q.new_zeros(B, 0, H, v.shape[3], dtype=out_dtype)
    if not return_final_state:
        return y
    window = None
    if c > 1:
        pos = torch.arange(T + c - 1, device=q.device) - (c - 1)
        live = (pos[None, :] >= first[:, None]).to(dtype)  # slots of the last document only
        window = (k_all[:, -(c - 1):], v_all[:, -(c - 1):], (g_all * live[..., None])[:, -(c - 1):])
    return y, MemoryState(W, S, window)
