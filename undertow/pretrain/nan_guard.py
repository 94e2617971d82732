"""The NaN guard's bookkeeping: which checkpoint holds good weights, and whether a step ruined them.

After every applied step the parameters' norm is measured (fused, one sync): non-finite, or grown
more than `training.max_param_growth` times in one step (a learning rate that blows the weights up
while the loss is still finite), and the run stops before it computes or saves anything from them.

A step whose loss or gradient norm is non-finite is skipped (a bad batch happens); a streak of
`training.max_bad_steps` of them means the weights themselves are poisoned. A checkpoint saved at
step s holds the weights that step s + 1 computes its loss with, so it is known good only once that
loss comes back finite: until then it is *pending*. The newest known-good checkpoint is protected
from keep_last pruning; when the run diverges, a pending checkpoint (poisoned weights) is set aside
and the error names the good one with the command that resumes from it.
"""

from __future__ import annotations

import os
import shlex
import sys

import torch
import torch.distributed as dist

from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain.config import MAX_LR

_DROPPED = ("--checkpoint.resume", "--resume", "--optimizer.lr")


@torch.no_grad()
def parameters_norm(params, distributed: bool) -> float:
    """The L2 norm of all parameters: non-finite when any parameter is (or the norm overflows float32,
    which only absurd weights reach). One fused kernel (torch._foreach_norm) and one host sync.

    Sharded and replicated parameters count each rank's local tensor (a replicated one once per
    replica): the same on every step, so the ratio of two steps' norms is what it is unsharded."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    local = [p for p in local if p.numel() and not p.is_meta]
    squares = torch.zeros((), device=local[0].device if local else "cpu")
    if local:
        squares = torch.stack(torch._foreach_norm(local)).float().square().sum()
    if distributed:
        dist.all_reduce(squares)
    return float(squares.sqrt())


def resume_command(path: str | None, lr: float) -> str:
    """The command that reruns this run from checkpoint `path` (or from the start) with a 10x lower
    peak learning rate: the `undertow pretrain ...` this process was started with when it was, else a
    template."""
    argv = sys.argv[1:]
    if "pretrain" in argv:
        args, rest = [], argv[argv.index("pretrain"):]
        skip = False
        for arg in rest:
            if skip:
                skip = False
            elif arg in _DROPPED:
                skip = True
            elif not arg.startswith(tuple(f"{d}=" for d in _DROPPED)):
                args.append(arg)
    else:
        args = ["pretrain", "RECIPE", "[OVERRIDES]"]
    args += ["--optimizer.lr", f"{min(lr / 10, MAX_LR):g}"]
    if path is not None:
        args += ["--checkpoint.resume", path]
    return "undertow " + " ".join(shlex.quote(a) if a not in ("RECIPE", "[OVERRIDES]") else a for a in args)


class GoodCheckpoints:
    """Tracks the newest checkpoint known good (protected from pruning) and the pending ones since."""

    def __init__(self, root: str, keep_last: int, lead: bool, resumed_from: str | None):
        self.root, self.keep_last, self.lead = root, keep_last, lead
        # A resumed checkpoint is pending like a fresh save; the ones before it were trained past.
        self.pending = [resumed_from] if resumed_from else []
        paths = [os.path.abspath(p) for _, p in ckpt.list_checkpoints(root)]
        resumed = os.path.abspath(resumed_from) if resumed_from else None
        at = paths.index(resumed) if resumed in paths else 0
        self.good = paths[at - 1] if at > 0 else None

    def saved(self, path: str) -> None:
        self.pending.append(path)

    def confirm(self) -> None:
        """A finite loss came from the current weights: the newest pending checkpoint (of them) is good."""
        if not self.pending:
            return
        self.good, self.pending = self.pending[-1], []
        if self.lead:  # the previously protected one may now fall outside keep_last
            ckpt.prune_checkpoints(self.root, self.keep_last, self.good)

    def poisoned(self) -> list[str]:
        """Set the pending checkpoints aside (their weights gave only non-finite losses); their new paths."""
        paths, self.pending = self.pending, []
        if not self.lead:
            return []
        return [ckpt.set_aside_nonfinite(p) for p in paths if os.path.isdir(p)]
