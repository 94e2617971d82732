"""RMSNorm (optionally gated and grouped) in PyTorch, light on memory: an autograd.Function that saves
only its inputs (in their own dtype) and the float32 1/rms per group, and recomputes the rest in backward.

Plain autograd over the reference keeps several float32 (..., dim) intermediates alive per layer
(x.float(), silu(z), the gated product, the normalized tensor); here nothing float32 of that size
outlives the call. Rows are processed in chunks of about CHUNK_ELEMENTS elements, so the float32
temporaries of forward and backward stay bounded too ("chunked" is the backend name of this form).
On CPU with everything float32, both directions are one native pass over each row instead
(native.py beside this file).

Backward, with g = x * silu(z) (or x), r = 1/rms per group, ĝ = g r and dĝ = dout * weight:
    dg      = r (dĝ - ĝ mean_group(dĝ ĝ))
    dweight = sum over rows of dout ĝ
    dx      = dg silu(z);  dz = dg x σ(z) (1 + z (1 - σ(z)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from undertow.kernels.rmsnorm import native
from undertow.kernels.rmsnorm.reference import check_inputs

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per temporary


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.reshape(-1, dim)


def _gated(x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    g = x.float()
    return g * F.silu(z.float()) if z is not None else g


class _RMSNormFunction(torch.autograd.Function):
    """(x, z or None, weight, group, eps, out_dtype) -> out (..., dim) in out_dtype."""

    @staticmethod
    def forward(ctx, x, z, weight, group, eps, out_dtype):
        dim = x.shape[-1]
        x2 = _rows(x, dim)
        z2 = _rows(z, dim) if z is not None else None
        ctx.group = group
        done = native.forward(x2, z2, weight, group, eps) if out_dtype == torch.float32 else None
        if done is not None:
            out, rstd = done
            ctx.save_for_backward(x, z, weight, rstd)
            return out.view(x.shape)
        R, groups = x2.shape[0], dim // group
        out = torch.empty(R, dim, dtype=out_dtype, device=x.device)
        rstd = torch.empty(R, groups, dtype=torch.float32, device=x.device)
        w = weight.float()
        step = max(1, CHUNK_ELEMENTS // dim)
        for r0 in range(0, R, step):
            g = _gated(x2[r0:r0 + step], z2[r0:r0 + step] if z2 is not None else None).view(-1, groups, group)
            r = torch.rsqrt(g.pow(2).mean(-1) + eps)
            rstd[r0:r0 + step] = r
            out[r0:r0 + step] = (g * r[..., None]).view(-1, dim) * w
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.group = group
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x, z, weight, rstd = ctx.saved_tensors
        dim, group = x.shape[-1], ctx.group
        groups = dim // group
        x2, d2 = _rows(x, dim), _rows(dout, dim)
        z2 = _rows(z, dim) if z is not None else None
        R = x2.shape[0]
        need_x, need_z, need_w = ctx.needs_input_grad[:3]
        done = native.backward(x2, z2, weight, rstd, d2, group, need_x, need_z)
        if done is not None:
            dx, dz, dw = done
            return (dx.view(x.shape) if need_x else None, dz.view(z.shape) if need_z else None,
                    dw.to(weight.dtype) if need_w else None, None, None, None)
        dx = torch.empty(R, dim, dtype=x.dtype, device=x.device) if need_x else None
        dz = torch.empty(R, dim, dtype=z.dtype, device=x.device) if need_z else None
        dw = torch.zeros(dim, dtype=torch.float32, device=x.device)
        w = weight.float()
        step = max(1, CHUNK_ELEMENTS // dim)
        for r0 in range(0, R, step):  # fresh temporaries only where needed; the rest in place
            rows = slice(r0, r0 + step)
            xc = x2[rows].float()  # x itself when x is float32: never written to
            r = rstd[rows, :, None]
            if z2 is not None:
                zc = z2[rows].float()
                sig = torch.sigmoid(zc)
                silu = zc * sig
                g_hat = (xc * silu).view(-1, groups, group).mul_(r)
            else:
                g_hat = xc.view(-1, groups, group) * r
            dc = d2[rows].float().view(-1, groups, group)
            prod = dc * g_hat  # dout * g_hat: dweight's terms, then (times weight) the mean's
            if need_w:
                dw += prod.sum(0).view(dim)
            if not (need_x or need_z):
                continue
            wv = w.view(groups, group)
            mean = prod.mul_(wv).mean(-1, keepdim=True)
            dg = (dc * wv).sub_(g_hat.mul_(mean)).mul_(r).view(-1, dim)  # r (dg_hat - g_hat mean)
            if z2 is None:
                dx[rows] = dg
                continue
            if need_x:
                dx[rows] = dg * silu
            if need_z:  # d silu(z) / dz = sig (1 + z - silu)
                dz[rows] = silu.neg_().add_(zc).add_(1.0).mul_(sig).mul_(xc).mul_(dg)
        dx = dx.view(x.shape) if need_x else None
        dz = dz.view(z.shape) if need_z else None
        return dx, dz, dw.to(weight.dtype) if need_w else None, None, None, None


def rmsnorm_chunked(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same signature and results as `rmsnorm_reference` (see reference.py)."""
    group = check_inputs(x, weight, z, group_size)
    return _RMSNormFunction.apply(x, z, weight, group, eps, out_dtype or x.dtype)
