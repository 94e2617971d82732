"""The router losses of one MoE forward from the statistics of the step's micro-batch: the tokens of
this forward on every data- and context-parallel rank together, so the losses are the same numbers
whatever the layout splits the micro-batch into.

    f_e = (routed pairs to e) / (N k)        P_e = sum_t p_te / N        N: tokens of all those ranks
    load balance (Switch Transformer)  E * sum_e f_e P_e          (1 when balanced)
    z-loss (ST-MoE)                    sum_t logsumexp(logits_t)^2 / N

Each rank sums its own tokens; one all-reduce (`SumOverRanks`, differentiable) adds the sums over the
`group` the parallel code hands the layer (parallel/apply.py: the "dp_cp" ranks; None on one
process). Its backward sums the ranks' gradients, which the data-parallel gradient averaging then
divides by the same ranks: each rank's tokens get exactly the gradient of the global losses.
A mean of per-rank means would equal the global mean only where every rank holds as many tokens; the
product of two means (f P) not even then.

A micro-batch is one forward: under gradient accumulation or pipeline micro-batches, the step's
balance loss is the mean of its forwards' (the statistics of a forward are all its backward can
wait for: a 1F1B schedule runs micro-batch 1's backward before micro-batch 2's forward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from undertow.kernels.moe.grouped import expert_counts


class SumOverRanks(torch.autograd.Function):
    """x (any shape) -> its sum over the ranks of `group`; backward: the gradients summed likewise
    (every rank's output is the same sum, and each rank's loss uses it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def token_stats(logits: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor, group=None) -> torch.Tensor:
    """logits, probs (N, E), idx (N, k) -> float64 (2 E + 2,): [sum_t p_t (E), sum_t lse_t^2,
    routed pairs per expert (E), tokens], summed over `group`'s ranks. float64: the counts stay exact,
    and sums over different splits of the tokens agree far below float32's precision."""
    E = logits.shape[-1]
    lse2 = torch.logsumexp(logits.float(), dim=-1).square().sum()
    counts = expert_counts(idx, E).to(torch.float64)
    n = torch.full((1,), float(idx.shape[0]), dtype=torch.float64, device=idx.device)
    stats = torch.cat([probs.sum(0).to(torch.float64), lse2.to(torch.float64).reshape(1), counts, n])
    return sum_over_ranks(stats, group)


@torch.compiler.disable  # eager under torch.compile: a collective inside an autograd.Function
def sum_over_ranks(stats: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return stats
    return SumOverRanks.apply(stats, group)


def balance_losses(logits: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor,
                   group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) float32 scalars, the load per expert f_e * E (E,) and the
    routed pairs per expert (E,) float64, both detached, of the micro-batch of every rank of `group`."""
    E, k = logits.shape[-1], idx.shape[-1]
    stats = token_stats(logits, probs, idx, group)
    n = stats[-1].clamp_min(1.0)
    counts = stats[E + 1:2 * E + 1].detach()
    load = counts / (n.detach() * k)
    balance = E * (load * stats[:E] / n).sum()
    z = stats[E] / n
    return balance.float(), z.float(), (load * E).float(), counts
