"""The "triton" backend of titans_memory: the linear memory (one matrix W per head, depth 1) under the
Titans rule -- l2 loss, momentum (or sgd), decay (or none), data-dependent theta/eta/alpha/gamma,
gradients at the chunk-start weights, document restarts, initial and final state -- with chunked.py's
semantics (same chunk-start spec, reference.py with `chunk_size`).

Split of the work: the gate-only coefficients of every chunk (cW, cS, c0, from_prev per token; P the
C x C intra-chunk mixing matrix; the last token's rows P_e, R and the exit scalars cW_e, cS_e, c0_e,
pe_e -- chunked.py's module docstring) are chunked.coefficients, in PyTorch under autograd (O(T C) per
head, no state). Everything that touches the memory -- the tokens' gradients at the chunk-start weights,
the readouts, the chunk-to-chunk state map and all of their adjoints -- is in the Triton kernels of
triton_linear_kernels.py, forward and a hand-written backward (triton_linear_kernels._bwd), which hands
back d(coefficients) for autograd to carry to the gates.

Not in this backend (refused with a message naming `backend='chunked'`): MLP memories (depth >= 2),
the Huber loss, the Omega window (window > 1), inner gradient clipping (max_grad_norm > 0), float64.
The NaN guard is applied to the inputs: a token whose k or v is not finite writes nothing, as in the
chunked form; a gradient that overflows from finite inputs (a diverged state) is not caught here.
Precision: float32 inputs are computed exactly in float32 (tl.dot "ieee"); half inputs keep their dtype
in memory and multiply in tf32 with float32 accumulation and states.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import ENV, no_autocast, segment_starts
from undertow.kernels.titans_memory.chunked import coefficients
from undertow.kernels.titans_memory.reference import check_inputs, start_state
from undertow.kernels.titans_memory.rule import MemoryState, UpdateRule

# Widest v tile of each kernel (a test lowers them so tiny Dv splits). Compiled for sm_90 (bf16, Dk = Dv = 128,
# chunk 64, 8 warps; scripts/titans_sm90_compile.py): _bwd_chunk needs 272 KiB of shared memory at 64 (the
# H100 has 227), 184 at 32; _fwd_out spills 280 B at 64. Untuned on a GPU.
BLOCK_V = {"_fwd_states": 32, "_fwd_out": 64, "_bwd_states": 32, "_bwd_chunk": 32}
NUM_WARPS = 8
MAX_DK = 256  # all of Dk is one tile


def refusal(q, init_weights, rule: UpdateRule) -> str | None:
    """Why this backend cannot run the configuration (None: it can)."""
    use = "; use backend='chunked'"
    if len(init_weights) != 1:
        return f"the Triton backend implements the linear memory (depth 1), not depth {len(init_weights)}{use}"
    if rule.loss != "l2" or rule.window != 1 or rule.max_grad_norm > 0:
        return (f"the Triton backend implements the Titans rule (loss 'l2', window 1, max_grad_norm 0), got loss "
                f"{rule.loss!r}, window {rule.window}, max_grad_norm {rule.max_grad_norm}{use}")
    if q.dtype == torch.float64:
        return f"the Triton backend computes in float32 (half inputs: tf32 products), not float64{use}"
    if q.shape[3] > MAX_DK:
        return f"the Triton backend holds all of Dk in one tile: Dk = {q.shape[3]} is above {MAX_DK}{use}"
    return None


def blocks(C: int, Dk: int, Dv: int, kernel: str) -> tuple[int, int, int, int]:
    """(BL, BK, BV, number of v tiles) of `kernel`: tl.dot needs every side >= 16."""
    import triton

    BV = max(16, min(triton.next_power_of_2(Dv), BLOCK_V[kernel]))
    return max(16, triton.next_power_of_2(C)), max(16, triton.next_power_of_2(Dk)), BV, triton.cdiv(Dv, BV)


class _LinearMemory(torch.autograd.Function):
    """(q, k, v (B, H, Tp, D); W0, S0 (B, H, Dk, Dv); M0 (H, Dk, Dv); cW, cS, c0 (B, H, Tp); from_prev
    (B, Tp); P (B, H, NC, C, C); last (B, H, NC, 4) = cW_e, cS_e, c0_e, pe_e; P_e, R (B, H, NC, C);
    has_docs) -> y (B, H, Tp, Dv) float32, final W, S (B, H, Dk, Dv) float32. Saved for the backward:
    the inputs and the NC entering states (2 NC Dk Dv float32 per row and head)."""

    @staticmethod
    def forward(ctx, q, k, v, W0, S0, M0, cW, cS, c0, fp, P, last, Pe, R, has_docs):
        from undertow.kernels.titans_memory.triton_linear_kernels import _fwd_out, _fwd_states

        B, H, Tp, Dk = q.shape
        Dv, NC, C = v.shape[3], P.shape[2], P.shape[3]
        f32 = dict(device=q.device, dtype=torch.float32)
        WST, SST = torch.empty(B, H, NC, Dk, Dv, **f32), torch.empty(B, H, NC, Dk, Dv, **f32)
        WF, SF = torch.empty(B, H, Dk, Dv, **f32), torch.empty(B, H, Dk, Dv, **f32)
        y = torch.empty(B, H, Tp, Dv, **f32)
        coeffs = (cW, cS, c0, fp, P, last, Pe, R)
        consts = dict(HAS_DOCS=has_docs, IS_F32=q.dtype == torch.float32, num_warps=NUM_WARPS)
        BL, BK, BV, NV = blocks(C, Dk, Dv, "_fwd_states")
        _fwd_states[(NV, B * H)](k, v, W0, S0, M0, *coeffs, WST, SST, WF, SF, H, Tp, Dk, Dv, C, NC,
                                 BL=BL, BK=BK, BV=BV, **consts)
        BL, BK, BV, NV = blocks(C, Dk, Dv, "_fwd_out")
        _fwd_out[(NC, B * H, NV)](q, k, v, M0, *coeffs, WST, SST, y, H, Tp, Dk, Dv, C, NC,
                                  BL=BL, BK=BK, BV=BV, **consts)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q, k, v, M0, *coeffs, WST, SST)
        ctx.has_docs = has_docs
        return y, WF, SF

    @staticmethod
    def backward(ctx, dy, dWF, dSF):
        from undertow.kernels.titans_memory.triton_linear_kernels import _bwd_chunk, _bwd_states

        q, k, v, M0, cW, cS, c0, fp, P, last, Pe, R, WST, SST = ctx.saved_tensors
        coeffs = (cW, cS, c0, fp, P, last, Pe, R)
        B, H, Tp, Dk = q.shape
        Dv, NC, C = v.shape[3], P.shape[2], P.shape[3]
        f32 = dict(device=q.device, dtype=torch.float32)
        zero = lambda g, shape: torch.zeros(shape, **f32) if g is None else g.float().contiguous()  # noqa: E731
        dy, dWF, dSF = zero(dy, (B, H, Tp, Dv)), zero(dWF, (B, H, Dk, Dv)), zero(dSF, (B, H, Dk, Dv))
        consts = dict(HAS_DOCS=ctx.has_docs, IS_F32=q.dtype == torch.float32, num_warps=NUM_WARPS)
        DWST, DSST = torch.empty_like(WST), torch.empty_like(SST)
        dW0, dS0, dM0 = (torch.empty(B, H, Dk, Dv, **f32) for _ in range(3))
        BL, BK, BV, NV = blocks(C, Dk, Dv, "_bwd_states")
        _bwd_states[(NV, B * H)](q, k, *coeffs, dy, dWF, dSF, DWST, DSST, dW0, dS0, dM0, H, Tp, Dk, Dv, C, NC,
                                 BL=BL, BK=BK, BV=BV, **consts)
        BL, BK, BV, NV = blocks(C, Dk, Dv, "_bwd_chunk")
        dq, dk = torch.empty(NV, B, H, Tp, Dk, **f32), torch.empty(NV, B, H, Tp, Dk, **f32)
        dv = torch.empty(B, H, Tp, Dv, **f32)
        dcW, dcS, dc0 = (torch.zeros(NV, B, H, Tp, **f32) for _ in range(3))
        dP, dlast = torch.empty(NV, *P.shape, **f32), torch.empty(NV, *last.shape, **f32)
        dPe, dR = torch.empty(NV, *Pe.shape, **f32), torch.empty(NV, *R.shape, **f32)
        _bwd_chunk[(NC, B * H, NV)](q, k, v, M0, *coeffs, WST, SST, dy, DWST, DSST,
                                    dq, dk, dv, dcW, dcS, dc0, dP, dlast, dPe, dR, B, H, Tp, Dk, Dv, C, NC,
                                    BL=BL, BK=BK, BV=BV, **consts)
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.to(v.dtype), dW0, dS0,
                dM0.sum(0) if ctx.has_docs else None, dcW.sum(0), dcS.sum(0), dc0.sum(0), None, dP.sum(0),
                dlast.sum(0), dPe.sum(0), dR.sum(0), None)


def titans_memory_triton(q, k, v, theta, eta, alpha, init_weights, *, gamma=None, rule: UpdateRule = UpdateRule(),
                         chunk_size: int = 64, initial_state: MemoryState | None = None, doc_ids=None,
                         return_final_state: bool = False):
    """Same arguments and results as chunked.titans_memory_chunked (module docstring for what is refused):
    q, k (B, T, H, Dk); v (B, T, H, Dv); theta, eta, alpha, gamma (B, T, H); init_weights = (M_0,) of
    shape (H, Dk, Dv). Returns y (B, T, H, Dv) in q's dtype [, final MemoryState (float32)]."""
    check_inputs(q, k, v, theta, eta, alpha, init_weights, gamma, rule, initial_state, doc_ids, chunk_size)
    why = refusal(q, init_weights, rule)
    if why is not None:
        raise ValueError(f"titans_memory: {why}")
    with no_autocast(q.device):
        return _run(q, k, v, theta, eta, alpha, init_weights[0], gamma, rule, chunk_size, initial_state, doc_ids,
                    return_final_state)


def _run(q, k, v, theta, eta, alpha, M0, gamma, rule, C, initial_state, doc_ids, return_final_state):
    B, T, H, _ = q.shape
    f32, io = torch.float32, (q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32)
    state = start_state((M0,), B, k, v, rule, f32) if initial_state is None else initial_state
    W0, S0 = (x[0].to(f32).contiguous() for x in (state.weights, state.momentum))
    if T == 0:
        y = q.new_zeros(B, 0, H, v.shape[3])
        return (y, MemoryState((W0,), (S0,), None)) if return_final_state else y
    # the NaN guard, on the inputs: a token whose k or v is not finite writes nothing (theta 0, k and v 0),
    # as chunked.py's guard skips its gradient; a gradient that overflows from finite inputs is not caught
    finite = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)  # (B, T, H); no host sync
    k, v = (torch.where(finite[..., None], x, torch.zeros_like(x)) for x in (k, v))
    theta = torch.where(finite, theta, torch.zeros_like(theta))
    bh = lambda x, dt=f32: x.to(dt).transpose(1, 2)  # noqa: E731  (B, T, H, ...) -> (B, H, T, ...)
    th, (et, al) = bh(theta), (bh(x) for x in rule.gates(eta, alpha))
    gm = torch.ones_like(th) if gamma is None else bh(gamma)
    starts = segment_starts(doc_ids, (B, T), q.device)
    seg = starts.long().cumsum(1)[:, None]
    cW, cS, c0, pe, P, R, from_prev = coefficients(th, et, al, gm, starts[:, None], seg, C, 1)
    n = P.shape[2]
    rows = torch.full((n,), C - 1, device=q.device)
    rows[-1] = (T - 1) % C
    pick = lambda x: x[:, :, torch.arange(n, device=q.device), rows]  # noqa: E731  each chunk's last real token
    last = torch.stack([pick(cW), pick(cS), pick(c0), pick(pe)], -1).contiguous()
    Pe = pick(P).contiguous()
    pad = n * C - T
    qp, kp, vp = (F.pad(bh(x, io), (0, 0, 0, pad)).contiguous() for x in (q, k, v))
    flat = lambda x: x.flatten(-2).contiguous()  # noqa: E731  (B, H, n, C) -> (B, H, Tp)
    has_docs = bool(starts.any())
    y, WF, SF = _LinearMemory.apply(qp, kp, vp, W0, S0, M0.to(f32).contiguous(), flat(cW), flat(cS), flat(c0),
                                    flat(from_prev[:, 0]), P.contiguous(), last, Pe, R.contiguous(), has_docs)
    y = y[:, :, :T].transpose(1, 2).to(q.dtype)
    return (y, MemoryState((WF,), (SF,), None)) if return_final_state else y


def usable(implementations: dict, q, init_weights, rule: UpdateRule, backend: str | None) -> tuple[str, ...]:
    """The backends titans_memory may choose from: without "triton" where this backend refuses the
    configuration and nobody forced it (the default then picks the chunked form); forced, it stays, so the
    call raises with the reason (`refusal`)."""
    forced = backend or os.environ.get(ENV)
    if forced == "triton" or refusal(q, init_weights, rule) is None:
        return tuple(implementations)
    return tuple(name for name in implementations if name != "triton")
