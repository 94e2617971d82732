"""Mamba-1 selective scan, chunked over time in PyTorch, with a hand-written backward.

The recurrence h_t = a_t * h_{t-1} + b_t, with a_t = exp(dt_t * A) (0 where a document starts,
which makes the reset exact) and b_t = dt_t * u_t * B_t, is cut into chunks of L steps. Per
chunk, everything but the recurrence itself is a few large vectorized ops over (L, Bt, N, Dc):
the decays and inputs, the contraction of the states with C, and in the backward every
gradient contraction (batched matmuls). The recurrence is one fused multiply-add over
(Bt, N, Dc) per step. Decays are only ever multiplied, never divided, so no exponent is positive
when A <= 0 (Mamba's A = -exp(A_log)); decays under TINY_DECAY are 0.

Where the time goes on CPU (one thread, T = 2048, Dc = 256, N = 16): the decays are T * N * Dc
exponentials, the largest single cost, so they are taken as exp2 of a pre-scaled exponent
(Sleef's exp2 runs twice as fast as its exp); tensors are time-major, so each step's state is
contiguous; each chunk's (L, Bt, N, Dc) tensors live in buffers allocated once per call (a fresh
megabyte per chunk cost page faults that took longer than the arithmetic); the threshold pass
against subnormals runs only when some dt * A can reach log(TINY_DECAY), which one min/max over
dt tells; resets are written into the few decays they touch.

Why not a parallel form inside the chunk: every (state, channel) pair decays at its own rate, so
the pairwise form with differences of cumulative log-decays needs (L, L, N, Dc) tensors, and a
Hillis-Steele scan passes over the chunk log2(L) times; on CPU both lose to touching each state
once (the Hillis-Steele form took twice as long at T = 2048, Dc = 256, N = 16). The form
h_t = exp(c_t) (h_0 + sum_{s<=t} exp(-c_s) b_s) with c the cumulative log-decay needs a cumsum
along time, which torch runs ~10x slower than the step loop (227 ms against ~20 ms for the
whole sequence), and a second exponential (or reciprocal) pass.

On CPU, forward and backward run as native loops when a C++ compiler is at hand (native.py,
native_scan.cpp): even fused, the per-step ops above cost a few microseconds each in dispatch,
and the loop over 2048 of them is most of the time; the native loops keep each row's state in
L1 and run ~3-5x faster (without gradients the whole op, softplus, D and z included, is one
loop). They follow the same plan: the forward keeps the state before every chunk, the backward
recomputes a chunk from it. The PyTorch loops below are the fallback (no compiler,
UNDERTOW_NATIVE=0) and run on every other device.

The (L, Bt, N, Dc) states exist for one chunk at a time: the forward keeps only each chunk's
incoming state, and the backward recomputes a chunk's states from it, then runs the adjoint
recurrence g_t = dh_t + a_{t+1} * g_{t+1} backwards through the chunk.

The elementwise parts around the recurrence (softplus and delta_bias, the D skip, the silu(z)
gate) go through ordinary autograd in `selective_scan_from_core`, which the Triton form shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from undertow.kernels.dispatch import segment_starts
from undertow.kernels.selective_scan.native import applies as native_applies
from undertow.kernels.selective_scan.native import (
    dt_floor,
    may_grow,
    native_backward,
    native_forward,
    native_inference,
)

CHUNK = 32
# Decays below this are taken as 0: their effect is ~1e-23 of a float32 ulp, and keeping them lets
# products fall into subnormal floats, which x86 CPUs process several times slower.
TINY_DECAY = 1e-30
LOG2_E = 1.4426950408889634


class _Plan:
    """What every chunk of one call shares: the inputs time-major (T, Bt, ...), so that a step's
    state (Bt, N, Dc) and a chunk's rows are contiguous; A^T * log2(e), since exp2 runs twice as
    fast as exp on CPU (AVX2 Sleef) and exp2(x log2 e) = exp(x); where the resets fall; and
    whether any decay can fall under TINY_DECAY (else the threshold pass is skipped)."""

    def __init__(self, u, dt, A, B, C, starts, chunk):
        self.Bt, self.T, self.Dc = u.shape
        self.N = A.shape[1]
        self.chunk = chunk
        self.u, self.dt = u.transpose(0, 1).contiguous(), dt.transpose(0, 1).contiguous()
        self.du = self.dt * self.u
        self.B, self.C = B.transpose(0, 1).contiguous(), C.transpose(0, 1).contiguous()
        self.A_t = A.t().contiguous()  # (N, Dc)
        self.A2 = self.A_t * LOG2_E
        # A lower bound of every exponent dt * A: the least product of the two ranges' ends. NaN
        # propagates through amin and takes the threshold path too.
        # On the meta device (the planner's memory profile) values are unknown: take the threshold
        # path and no resets (they change no tensor's size).
        meta = u.device.type == "meta"
        if meta or not dt.numel():
            self.tiny = meta
        else:
            lowest = torch.outer(torch.stack(torch.aminmax(dt)), torch.stack(torch.aminmax(A))).amin()
            self.tiny = not bool(lowest >= math.log(TINY_DECAY))
        self.resets = {}  # chunk start -> (time index within the chunk, row) of its resets
        for t, b in ([] if meta else starts.t().nonzero().tolist()):
            c0 = t - t % chunk
            self.resets.setdefault(c0, ([], []))
            self.resets[c0][0].append(t - c0)
            self.resets[c0][1].append(b)

    def chunks(self):
        """(start, length) of each chunk."""
        return [(c0, min(self.chunk, self.T - c0)) for c0 in range(0, self.T, self.chunk)]

    def buffer(self):
        """One chunk's (L, Bt, N, Dc) float32 scratch; reused across chunks, since allocating a
        fresh megabyte per chunk costs page faults that took longer than the arithmetic."""
        return self.u.new_empty(self.chunk, self.Bt, self.N, self.Dc)

    def decays_(self, out, c0, n):
        """a_t = exp(dt_t A) for the chunk's n steps, written into out[:n]: 0 at resets and
        under TINY_DECAY."""
        a = torch.mul(self.dt[c0:c0 + n].unsqueeze(2), self.A2, out=out[:n]).exp2_()
        if self.tiny:
            F.threshold_(a, TINY_DECAY, 0.0)
        if c0 in self.resets:
            t_idx, b_idx = self.resets[c0]
            a[t_idx, b_idx] = 0.0
        return a

    def states_(self, out, a, h, c0, n):
        """States H_t = a_t H_{t-1} + dt_t u_t B_t of the chunk from H_{-1} = h, into out[:n]."""
        H = torch.mul(self.B[c0:c0 + n].unsqueeze(-1), self.du[c0:c0 + n].unsqueeze(2), out=out[:n])
        for H_t, a_t in zip(H.unbind(0), a.unbind(0)):
            h = H_t.addcmul_(a_t, h)
        return H


class _ScanCore(torch.autograd.Function):
    """y_t[d] = sum_n C_t[n] h_t[n, d] over the recurrence above; all tensors float32. States are
    laid out (N, Dc) so that the contractions over n and over d are both batched matmuls."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, starts, chunk):
        ctx.mark_non_differentiable(starts)
        ctx.chunk = chunk
        h = h0.transpose(1, 2).contiguous()
        grow = may_grow(A, dt_floor(dt)) if native_applies(u, A) else 1
        done = native_forward(u, dt, A, B, C, h, starts, chunk, TINY_DECAY, grow)
        if done is not None:  # the same recurrence as a native CPU loop (native.py)
            y, incoming, h = done
            ctx.plan, ctx.grow = None, grow  # the plan is built by the backward, if it needs one
            ctx.save_for_backward(incoming, u, dt, A, B, C, starts)
            return y, h.transpose(1, 2).contiguous()
        plan = _Plan(u, dt, A, B, C, starts, chunk)
        Bt, N, Dc = plan.Bt, plan.N, plan.Dc
        y = u.new_empty(plan.T, Bt, Dc)
        a_buf, h_buf = plan.buffer(), plan.buffer()
        incoming = []
        for c0, n in plan.chunks():
            incoming.append(h)
            a = plan.decays_(a_buf, c0, n)
            H = plan.states_(h_buf, a, h, c0, n)
            torch.bmm(plan.C[c0:c0 + n].view(n * Bt, 1, N), H.view(n * Bt, N, Dc), out=y[c0:c0 + n].view(n * Bt, 1, Dc))
            h = H[-1].clone()  # the buffer is overwritten by the next chunk
        ctx.plan = plan
        ctx.save_for_backward(torch.stack(incoming, 0) if incoming else h.unsqueeze(0))
        return y.transpose(0, 1), h.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dy, dh_final):
        incoming, *inputs = ctx.saved_tensors
        if ctx.plan is None:  # the native forward ran: so does the native backward, where it can
            u, dt, A, B, C, starts = inputs
            dy = torch.zeros_like(u) if dy is None else dy
            dh = None if dh_final is None else dh_final.transpose(1, 2)
            done = native_backward(u, dt, A, B, C, starts, incoming, dy, dh, ctx.chunk, TINY_DECAY, ctx.grow)
            if done is not None:
                du, ddt, dA, dB, dC, dh0 = done
                return du, ddt, dA, dB, dC, dh0.transpose(1, 2), None, None
        plan = ctx.plan or _Plan(*inputs, ctx.chunk)
        Bt, N, Dc = plan.Bt, plan.N, plan.Dc
        dy = torch.zeros_like(plan.u) if dy is None else dy.transpose(0, 1).contiguous()
        dB, dC = torch.empty_like(plan.B), torch.empty_like(plan.C)
        GB = torch.empty_like(plan.u)  # sum_n B_t[n] G_t[n, d]
        dtA_grad = torch.empty_like(plan.u)  # sum_n A[d, n] (d loss / d(dt_t A)[n, d])
        dA_t = torch.zeros_like(plan.A_t)
        a_buf, h_buf, g_buf, s_buf = plan.buffer(), plan.buffer(), plan.buffer(), plan.buffer()
        g = torch.zeros_like(incoming[0]) if dh_final is None else dh_final.transpose(1, 2).contiguous()
        for i, (c0, n) in reversed(list(enumerate(plan.chunks()))):
            h_in, sl, nB = incoming[i], slice(c0, c0 + n), n * Bt
            a = plan.decays_(a_buf, c0, n)
            H = plan.states_(h_buf, a, h_in, c0, n)
            torch.bmm(H.view(nB, N, Dc), dy[sl].view(nB, Dc, 1), out=dC[sl].view(nB, N, 1))
            G = torch.mul(plan.C[sl].unsqueeze(-1), dy[sl].unsqueeze(2), out=g_buf[:n])
            G[-1] += g
            G_steps, a_steps = G.unbind(0), a.unbind(0)
            for t in range(n - 2, -1, -1):  # G_t = d loss / d h_t
                G_steps[t].addcmul_(a_steps[t + 1], G_steps[t + 1])
            torch.bmm(G.view(nB, N, Dc), plan.du[sl].view(nB, Dc, 1), out=dB[sl].view(nB, N, 1))
            torch.bmm(plan.B[sl].view(nB, 1, N), G.view(nB, N, Dc), out=GB[sl].view(nB, 1, Dc))
            # d loss / d(dt A) = G_t a_t h_{t-1}; zero at resets and tiny decays since a is
            S = torch.mul(G, a, out=s_buf[:n])
            S[1:] *= H[:-1]
            S[0] *= h_in
            g = a[0] * G[0]
            dA_t += torch.mul(S, plan.dt[sl].unsqueeze(2), out=g_buf[:n]).sum((0, 1))
            torch.sum(S.mul_(plan.A_t), 2, out=dtA_grad[sl])
        du = GB * plan.dt
        ddt = GB.mul_(plan.u).add_(dtA_grad)
        return (du.transpose(0, 1), ddt.transpose(0, 1), dA_t.t(), dB.transpose(0, 1), dC.transpose(0, 1),
                g.transpose(1, 2), None, None)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, doc_ids):
    Bt, T, Dc = u.shape
    N = A.shape[-1]
    expected = {
        "delta": (delta, (Bt, T, Dc)), "A": (A, (Dc, N)), "B": (B, (Bt, T, N)), "C": (C, (Bt, T, N)),
        "D": (D, (Dc,)), "z": (z, (Bt, T, Dc)), "delta_bias": (delta_bias, (Dc,)),
        "initial_state": (initial_state, (Bt, Dc, N)), "doc_ids": (doc_ids, (Bt, T)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(tensor.shape)}; expected {shape}")


Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def selective_scan_from_core(
    core: Core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, doc_ids, return_final_state
):
    """Shared by the chunked and Triton forms: `core(u, dt, A, B, C, h0, starts)` runs the
    recurrence on float32 dt (Bt, T, Dc) and h0 (Bt, Dc, N) and returns (y_core, final_state)."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, doc_ids)
    Bt, T, Dc = u.shape
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    h0 = initial_state.float() if initial_state is not None else u.new_zeros(Bt, Dc, A.shape[1], dtype=torch.float32)
    starts = segment_starts(doc_ids, (Bt, T), u.device)
    y, h = core(u, dt, A, B, C, h0, starts)
    if D is not None:
        y = y + D.float() * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def _inference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, doc_ids):
    """Without autograd on CPU: the whole op in one native loop (native.py), or None."""
    if not native_applies(u, A):
        return None
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, doc_ids)
    Bt, T, Dc = u.shape
    h0 = u.new_zeros(Bt, A.shape[1], Dc, dtype=torch.float32) if initial_state is None else initial_state.transpose(1, 2)
    starts = segment_starts(doc_ids, (Bt, T), u.device)
    done = native_inference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, starts, TINY_DECAY)
    if done is None:
        return None
    y, h = done
    return y.to(u.dtype), h.transpose(1, 2).contiguous()


def _chunked_core(u, dt, A, B, C, h0, starts):
    return _ScanCore.apply(u.float(), dt, A.float(), B.float(), C.float(), h0, starts, CHUNK)


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, *,
    initial_state=None, doc_ids=None, return_final_state=False,
):
    """u, delta, z: (Bt, T, Dc); A: (Dc, N); B, C: (Bt, T, N); D, delta_bias: (Dc,);
    initial_state: (Bt, Dc, N); doc_ids: (Bt, T).
    Returns y (Bt, T, Dc) in u's dtype [, final_state (Bt, Dc, N) float32]."""
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        done = _inference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, doc_ids)
        if done is not None:
            y, h = done
            return (y, h) if return_final_state else y
    return selective_scan_from_core(
        _chunked_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, doc_ids, return_final_state
    )
