"""Next-token cross-entropy for causal LMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens it sums over.

    `logits` (batch, seq, vocab) at position t predict `labels` at t + 1; labels of -100 are not
    trained. Returning the sum (not the mean) lets the caller divide by the token count of the
    whole accumulated batch, so gradient accumulation weighs every token equally.
    """
    shift_logits = logits[:, :-1, :].flatten(0, 1).float()
    shift_labels = labels[:, 1:].flatten()
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()
