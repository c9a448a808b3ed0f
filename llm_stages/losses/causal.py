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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probabilities of the labelled tokens, their count, and the mean
    logit over them (TRL's `logits/chosen` statistic). Shapes: (batch,), (batch,), (batch,)."""
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # log p(label) = logit[label] - logsumexp(logits): no full log_softmax copy of the logits.
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - logits.logsumexp(-1)) * mask
    n_tokens = mask.sum(-1)
    mean_logits = (logits.mean(-1) * mask).sum(-1) / n_tokens.clamp(min=1)
    return token_logps.sum(-1), n_tokens, mean_logits
