"""The LM head's cross-entropy without the logits tensor: `head_loss_sum(hidden, weight, labels)`.

The unfused loss materializes (tokens, vocab) logits and walks them several times: the head's
matmul writes them, a soft-cap (xLSTM) reads and writes them, log-softmax and the gather read them,
and the backward does it all again with the saved copies. At a 7B model's vocabulary that tensor
is the step's largest (8 x 4096 tokens x 50,304 entries in float32: 6.6 GB, and its gradient). Here
the rows are taken in ceil(vocab / d) chunks (each chunk's logits about as large as the hidden
states, as Liger-Kernel's fused linear cross-entropy sizes them: a chunk reads the whole weight, so
fewer, larger chunks on a GPU; at the CPU benchmark's shape, 128 rows of 2,048 logits, which stay in
the cache): for each chunk the head's matmul, the
soft-cap, log-sum-exp and the loss, and right away the gradient of the chunk's logits,

    d loss / d z = (softmax(y) - onehot(label)) * (1 - (y / cap)^2),   y = cap * tanh(z / cap)

(no soft-cap: the last factor is 1), turned into the hidden states' and the weight's gradients by
two matmuls. The forward computes the gradients (scaled in the backward by the incoming gradient
of the loss); nothing of size (tokens, vocab) outlives a chunk. Labels IGNORE_INDEX count neither
in the loss nor in the gradients, as F.cross_entropy(reduction="sum") counts them.

Precision as the unfused head: the matmuls in the autocast dtype when autocast is on (else the
weight's dtype), the logits, soft-cap, softmax and loss in float32; the weight's gradient summed
over the chunks in float32. Without gradients (validation) only the loss is computed.
Measured (docs/benchmarks.md, "xLSTM kernels and step on CPU"): 2,048 tokens, d 128, vocab 2,048,
soft-cap 30, forward + backward: 53 -> 33 ms at 1 thread, 28 -> 19 ms at 2.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from undertow.kernels.cross_entropy import native as native_xent
from undertow.models.common.loss import IGNORE_INDEX


def _no_autocast(device: str):
    """Autocast off for `device` inside (the dtypes are chosen here); nothing to turn off where it is
    off, or on the meta device (the planner's profile emulates autocast there, models/profile.py)."""
    if device == "meta" or not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


def chunk_rows(tokens: int, vocab: int, d: int) -> int:
    """Rows per chunk: `tokens` split into ceil(vocab / d) chunks (module docstring)."""
    return max(1, -(-tokens // -(-vocab // d)))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The head matmul's dtype: autocast's when it is on for hidden's device, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _chunk_loss(z: torch.Tensor, labels: torch.Tensor, soft_cap: float | None, grad: bool):
    """z (rows, V) float32 logits of a chunk (overwritten) -> (loss sum, the gradient of the loss with
    respect to z, or None without `grad`). On CPU one native pass per row (kernels/cross_entropy);
    else in place with PyTorch ops, two (rows, V) buffers in all: fresh buffers of a few MiB each
    cost page faults on a CPU, and a chunk that stays in the cache is the point of chunking."""
    loss = native_xent.rows_loss(z, labels, soft_cap, IGNORE_INDEX, grad)
    if loss is not None:
        return loss, z if grad else None
    valid = labels != IGNORE_INDEX
    t = None
    if soft_cap is not None:
        t = torch.tanh_(z.mul_(1.0 / soft_cap))
        y = t * soft_cap
    else:
        y = z
    target = y.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    top = y.amax(1, keepdim=True)
    e = y.sub_(top).exp_()  # exp(y - max), in place of y
    norm = e.sum(1, keepdim=True)
    loss = torch.where(valid, (norm.log() + top).squeeze(1) - target, 0.0).sum()
    if not grad:
        return loss, None
    g = e.div_(norm)
    g[torch.arange(g.shape[0], device=g.device), labels.clamp_min(0)] -= 1.0  # softmax - onehot
    g.mul_(valid[:, None])
    if t is not None:  # through the soft-cap: g (1 - t^2)
        g.addcmul_(g, t.mul_(t), value=-1.0)
    return loss, g


def _chunks(hidden, weight, labels, soft_cap, rows: int, dtype, need_h: bool, need_w: bool):
    """The summed loss over chunks of `rows` rows, and the gradients asked for: hidden's (in `dtype`)
    and the weight's (float32), or None."""
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    g_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
    g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start:start + rows].to(dtype)
        loss, g = _chunk_loss(torch.mm(h, w.t()).float(), labels[start:start + rows], soft_cap, need_h or need_w)
        total += loss
        if g is None:
            continue
        g = g.to(dtype)
        if need_h:
            torch.mm(g, w, out=g_hidden[start:start + rows])
        if need_w:
            if dtype == torch.float32:
                g_weight.addmm_(g.t(), h)
            else:
                g_weight += torch.mm(g.t(), h).float()
    return total, g_hidden, g_weight


class _HeadLoss(torch.autograd.Function):
    """(hidden (N, d), weight (V, d)) -> the summed loss; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, soft_cap, rows, dtype):
        total, g_hidden, g_weight = _chunks(hidden, weight, labels, soft_cap, rows, dtype,
                                            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(g_hidden, g_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        g_hidden, g_weight = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if g_hidden is None else (g_hidden * grad).to(h_dtype),
                None if g_weight is None else (g_weight * grad).to(w_dtype), None, None, None, None)


def head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, soft_cap: float | None = None,
                  rows: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy (float32, 0-d) of logits = hidden @ weight.T, soft-capped
    to (-soft_cap, soft_cap) when given, over the labels that are not IGNORE_INDEX: the value and
    gradients of lm_loss_sum(soft_cap(head(hidden))), without the logits tensor. hidden (..., d),
    weight (V, d), labels hidden's leading shape; `rows` per chunk (default: `chunk_rows`)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"head_loss_sum: hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
                         "must share the leading dimensions")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"head_loss_sum: soft_cap must be > 0 or None, got {soft_cap!r}")
    dtype = compute_dtype(hidden, weight)
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = rows or chunk_rows(hidden.shape[0], weight.shape[0], weight.shape[1])
    with _no_autocast(hidden.device.type):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _HeadLoss.apply(hidden, weight, labels, soft_cap, rows, dtype)
        return _chunks(hidden, weight, labels, soft_cap, rows, dtype, False, False)[0]  # validation: the loss


class LMHead(nn.Linear):
    """The LM head (a bias-free nn.Linear): forward(x) -> logits; forward(x, labels, soft_cap) -> the
    summed cross-entropy by `head_loss_sum`. The loss goes through the module's forward so that
    whatever gathers the weight around it (FSDP2, DeepSpeed ZeRO-3 hooks) does so as for the logits."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, soft_cap: float | None = None):
        if labels is None:
            return super().forward(x)
        if self.bias is not None:
            raise ValueError("LMHead: the fused loss takes a head without bias")
        return head_loss_sum(x, self.weight, labels, soft_cap)
