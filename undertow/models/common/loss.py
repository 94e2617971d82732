"""Language-model loss."""

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in float32 over positions whose label is not -100.

    logits: (B, T, V); labels: (B, T) -> scalar. Divide by the number of counted labels
    (over all micro-batches of a step) for the mean.

    Under tensor parallelism logits is a DTensor sharded on the vocabulary; call this (and backward)
    inside parallel/tensor.py's `loss_context`, where the cross-entropy runs on the shards. The sum
    is then the same on every rank and is returned as a plain tensor.
    """
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss.full_tensor() if isinstance(loss, DTensor) else loss
