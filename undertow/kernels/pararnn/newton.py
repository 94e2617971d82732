"""ParaRNN's parallel-in-time solver (the dispatch's "chunked" and "triton" backends): the whole
sequence's recurrence s_t = f(s_{t-1}, u_t) solved by Newton's method, every Newton step a linear
recurrence solved by a chunked scan (scan.py; on CPU in float32 all steps fused into one native
pass, native.py; on "triton" fused Triton passes, triton_newton.py).

Newton on the residual F_t(s) = s_t - f(s_{t-1}, u_t), all t at once:
    guess      s_t = f(0, u_t)                                               (N0)
    step       delta_t = J_t delta_{t-1} + r_t,   r_t = f(s_{t-1}, u_t) - s_t,
               J_t = df/ds at (s_{t-1}, u_t), delta_{-1} = 0                 (N1: J delta = -F)
    update     s <- s + delta                                                (N2)
J_t is diagonal for the GRU and 2x2 per channel for the LSTM (the cells' recurrences are diagonal);
where a document starts J_t = 0 (the state before it is the constant zero). After k steps the first
k tokens are exact (step k fixes token k from an exact s_{k-1}), so `iterations` >= T always
converges; near the solution the error is roughly squared each step, so for weak recurrences
(a, p ~ 0.1 N(0, 1)) 3 steps leave a residual ~1e-10 even at T = 1000 (strong ones need more).

Non-convergence is never silent: the final residual max |F_t| is returned (return_residual) and a
`NewtonNotConvergedWarning` is raised when it stays above `tol`, or above sqrt(eps) of the compute
dtype when no tol is given. With `tol`, the iterations stop early once the residual is <= tol.

Backward by the implicit function theorem at the solution s* = f(shift(s*), u): with g_t = dL/ds_t,
    lam_t = g_t + J_{t+1}^T lam_{t+1}                                        (B1, one reverse scan)
    dL/d(u, a, p, s_{-1}) = lam^T df/d(u, a, p, s_{t-1})                     (B2, local, all t at once)
B2 is one vector-Jacobian product of a single cell evaluation over all tokens; nothing is
differentiated through the Newton iterations. Its gradients equal the reference loop's exactly at
the solution, and up to the residual's size when Newton has not converged.
"""

from __future__ import annotations

import warnings

import torch

from undertow.kernels.dispatch import segment_starts
from undertow.kernels.pararnn.native import native_backward, native_solve
from undertow.kernels.pararnn.reference import (
    cell_step, check_inputs, gru_gates, lstm_gates, public_state, state_tensor,
)
from undertow.kernels.pararnn.scan import linear_recurrence, reverse_linear_recurrence


class NewtonNotConvergedWarning(RuntimeWarning):
    """The Newton solve ended with a residual above its tolerance: its outputs are not the cell's."""


def step_and_jacobian(cell: str, prev: torch.Tensor, u: torch.Tensor, a: torch.Tensor, p) -> tuple:
    """f(prev, u) (..., S, D) and J = df/dprev (..., S, S, D), J[i, j] = d f_i / d prev_j; state rows
    (h) or (c, h). Derivatives of eqs. G1-G4 and L1-L5 (reference.py), sigma' = s (1 - s), tanh' = 1 - t^2."""
    if cell == "gru":
        h = prev[..., 0, :]
        z, r, h_tilde = gru_gates(h, u, a)
        a_z, a_r, a_h = a.unbind(0)
        dz = z * (1 - z) * a_z                                         # d G1 / dh
        dr = r * (1 - r) * a_r                                         # d G2 / dh
        dh_tilde = (1 - h_tilde * h_tilde) * a_h * (r + h * dr)        # d G3 / dh
        J = dz * (h_tilde - h) + z * dh_tilde + (1 - z)                # d G4 / dh
        return (z * h_tilde + (1 - z) * h).unsqueeze(-2), J[..., None, None, :]
    c, h = prev[..., 0, :], prev[..., 1, :]
    f, c_tilde, c_new, o, tanh_c = lstm_gates(c, h, u, a, p)
    a_f, a_c, a_o = a.unbind(0)
    p_f, p_o = p.unbind(0)
    df = f * (1 - f)
    dc_dc = f + (c - c_tilde) * df * p_f                               # d L3 / dc (through L1's peephole)
    dc_dh = (c - c_tilde) * df * a_f + (1 - f) * (1 - c_tilde * c_tilde) * a_c   # d L3 / dh (L1, L2)
    do = o * (1 - o)
    via_c = do * p_o * tanh_c + o * (1 - tanh_c * tanh_c)             # d L5 / dc' (L4's peephole and tanh)
    dh_dc = via_c * dc_dc
    dh_dh = do * a_o * tanh_c + via_c * dc_dh
    J = torch.stack((torch.stack((dc_dc, dc_dh), -2), torch.stack((dh_dc, dh_dh), -2)), -3)
    return torch.stack((c_new, o * tanh_c), -2), J


def previous_states(states: torch.Tensor, init: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """s_{t-1} for every t: (B, T, S, D) from the solution (B, T, S, D), the initial state (B, S, D)
    and keep (B, T, 1, 1), 0 where a document starts (the state before it is zero)."""
    return torch.cat((init[:, None], states[:, :-1]), 1) * keep


def cell_vjp(cell: str, prev: torch.Tensor, u: torch.Tensor, a: torch.Tensor, p, lam: torch.Tensor) -> tuple:
    """Eq. B2: lam (B, T, S, D) times the cell step's derivatives at prev (B, T, S, D) (by autograd) ->
    (d_u, d_a, d_prev, d_p; d_p None when p is None). Shared by the one-process and the cp backward."""
    leaves = [t.detach().requires_grad_() for t in (u, a, prev)] + ([] if p is None else [p.detach().requires_grad_()])
    with torch.enable_grad():
        f = cell_step(cell, leaves[2], leaves[0], leaves[1], leaves[3] if p is not None else None)
        grads = torch.autograd.grad(f, leaves, lam)
    return grads[0], grads[1], grads[2], grads[3] if p is not None else None


def newton_solve(cell, u, a, p, init, keep, iterations: int, tol: float | None, chunk_size: int) -> tuple:
    """Eqs. N0-N2 without autograd. u (B, T, 3, D), init (B, S, D), keep (B, T, 1, 1) ->
    (states (B, T, S, D), residual: max |F_t| at the returned states, a 0-d tensor)."""
    states = cell_step(cell, torch.zeros_like(init)[:, None], u, a, p)  # N0
    for _ in range(iterations):
        f, J = step_and_jacobian(cell, previous_states(states, init, keep), u, a, p)
        r = f - states
        residual = r.abs().amax()
        if tol is not None and residual <= tol:
            return states, residual
        states = states + linear_recurrence(J * keep[..., None], r, chunk_size)  # N1, N2
    f = cell_step(cell, previous_states(states, init, keep), u, a, p)
    return states, (f - states).abs().amax()


class _NewtonSolve(torch.autograd.Function):
    """(u, a, p, init) -> (states (B, T, S, D), residual 0-d); backward by eqs. B1-B2."""

    @staticmethod
    def forward(ctx, cell, u, a, p, init, keep, iterations, tol, chunk_size, fused):
        if fused == "triton":  # fused Triton passes (triton_newton.py)
            from undertow.kernels.pararnn.triton_newton import newton_solve_triton  # imports triton: on first use
            solved = newton_solve_triton(cell, u, a, p, init, keep, iterations, tol)
        else:  # CPU float32: one fused C++ pass (native.py) when it builds
            solved = native_solve(cell, u, a, p, init, keep, iterations, tol)
        states, residual = solved if solved is not None else newton_solve(cell, u, a, p, init, keep, iterations,
                                                                          tol, chunk_size)
        ctx.save_for_backward(u, a, p, init, keep, states)
        ctx.cell, ctx.chunk_size, ctx.fused = cell, chunk_size, fused
        ctx.mark_non_differentiable(residual)
        return states, residual

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_states, _):
        u, a, p, init, keep, states = ctx.saved_tensors
        if ctx.fused == "triton":  # one fused Triton pass (triton_newton.py)
            from undertow.kernels.pararnn.triton_newton import newton_backward_triton
            grads = newton_backward_triton(ctx.cell, u, a, p, init, keep, states, g_states)
        else:  # CPU float32: one C++ pass (native.py) when it builds
            grads = native_backward(ctx.cell, u, a, p, init, keep, states, g_states)
        if grads is not None:
            d_u, d_a, d_p, d_init = grads
            return None, d_u, d_a, d_p, d_init, None, None, None, None, None
        prev = previous_states(states, init, keep)
        _, J = step_and_jacobian(ctx.cell, prev, u, a, p)
        lam = reverse_linear_recurrence(J * keep[..., None], g_states, ctx.chunk_size)  # B1
        d_u, d_a, d_prev, d_p = cell_vjp(ctx.cell, prev, u, a, p, lam)  # B2
        # s_{-1} feeds token 0 only, which never starts a document (segment_starts), so keep is 1 there
        return None, d_u, d_a, d_p, d_prev[:, 0], None, None, None, None, None


def pararnn_newton(
    cell: str,
    inputs: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor | None = None,
    *,
    iterations: int = 3,
    tol: float | None = None,
    chunk_size: int = 64,
    initial_state=None,
    doc_ids: torch.Tensor | None = None,
    return_final_state: bool = False,
    return_residual: bool = False,
    scan: str = "chunked",
):
    """Same contract as `pararnn_reference` (reference.py), solved by `iterations` Newton steps
    (stopping early once max |F_t| <= tol when tol is given). `scan` "chunked": each step a chunked
    scan of `chunk_size` tokens (scan.py), or on CPU in float32 all steps in one fused native pass
    (native.py); "triton": fused Triton passes forward and one fused reverse pass backward
    (triton_newton.py; float32 or lower inputs, computed in float32). Returns h (B, T, D)
    [, final_state] [, residual (0-d, compute dtype: max |F_t| at the returned states)]; warns
    `NewtonNotConvergedWarning` when the residual stays above tol (or above sqrt(eps) of the compute
    dtype without tol). The warning reads the residual on the host."""
    check_inputs(cell, inputs, a, p)
    check_solver_args(iterations, tol, chunk_size)
    B, T, _, D = inputs.shape
    work = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    if scan == "triton" and work == torch.float64:
        raise ValueError("pararnn: the triton backend computes in float32; run float64 inputs on 'chunked'")
    init = state_tensor(cell, initial_state, B, D, inputs.device, work)
    keep = (~segment_starts(doc_ids, (B, T), inputs.device)).to(work)[:, :, None, None]
    states, residual = _NewtonSolve.apply(cell, inputs.to(work), a.to(work), None if p is None else p.to(work),
                                          init, keep, iterations, tol, chunk_size, scan)
    return solver_outputs(cell, inputs, states, residual, iterations, tol, return_final_state, return_residual)


def check_solver_args(iterations: int, tol: float | None, chunk_size: int) -> None:
    """Refuses a Newton setting the solver cannot run, naming the value and the valid range."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"pararnn: iterations must be an integer >= 1, got {iterations!r}")
    if tol is not None and not tol > 0:  # NaN included
        raise ValueError(f"pararnn: tol must be > 0 (or None: run every iteration), got {tol!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"pararnn: chunk_size must be an integer >= 1, got {chunk_size!r}")


def solver_outputs(cell, inputs, states, residual, iterations, tol, return_final_state, return_residual):
    """Warns when the residual (0-d) stays above tol (or sqrt(eps) of the compute dtype) and packs
    h (B, T, D) in inputs' dtype [, final state] [, residual] from the states (B, T, S, D)."""
    limit = tol if tol is not None else torch.finfo(states.dtype).eps ** 0.5
    # NaN included; meta tensors (the planner's shape-only runs) have no value to read
    if residual.device.type != "meta" and not residual <= limit:
        warnings.warn(f"pararnn: Newton ended with residual {residual.item():.3g} > {limit:.3g} after "
                      f"{iterations} iteration(s) at T = {states.shape[1]} (per cp rank under context parallelism); "
                      "the outputs are not the cell's. Raise `iterations` (T iterations are always exact) "
                      "or weaken the recurrence.",
                      NewtonNotConvergedWarning, stacklevel=3)
    out = (states[:, :, -1].to(inputs.dtype),)
    if return_final_state:
        out += (public_state(cell, states[:, -1]),)
    if return_residual:
        out += (residual,)
    return out if len(out) > 1 else out[0]
