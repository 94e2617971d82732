"""Language-model loss."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in float32 over positions whose label is not -100.

    logits: (B, T, V); labels: (B, T) -> scalar. Divide by the number of counted labels
    (over all micro-batches of a step) for the mean.
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
