"""Next-token cross-entropy for causal LMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def labelled_logits(model, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits from the first position that predicts a label on, and the labels aligned
    with them, for `token_cross_entropy` / `sequence_logps`. The positions before it (the prompt
    part every row of the batch shares) never reach the LM head (HF's `logits_to_keep`): with a
    large vocabulary that head and its float logits are a good part of a step's time and memory.
    """
    predicts_label = (labels[:, 1:] != IGNORE_INDEX).any(0)
    start = int(predicts_label.int().argmax()) if bool(predicts_label.any()) else 0
    logits = model(**inputs, use_cache=False, logits_to_keep=labels.shape[1] - start).logits
    return logits, labels[:, start:]


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
