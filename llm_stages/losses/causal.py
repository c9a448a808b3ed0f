"""Next-token cross-entropy for causal LMs."""

from __future__ import annotations

import torch

from llm_stages.losses.chunked import IGNORE_INDEX, LastPositions, head_outputs

__all__ = ["IGNORE_INDEX", "labelled_logits", "labelled_outputs", "sequence_logps", "token_cross_entropy"]


def labelled_outputs(model, labels: torch.Tensor, **inputs) -> tuple[LastPositions, torch.Tensor]:
    """The model's outputs (hidden states for the chunked LM head, or logits: llm_stages.losses.chunked)
    from the first position that predicts a label on, and the labels aligned with them, for
    `token_cross_entropy` / `sequence_logps`. The positions before it (the prompt part every row of
    the batch shares) never reach the LM head: with a large vocabulary that head and its float
    logits are a good part of a step's time and memory."""
    start = _first_predicting(labels)
    return head_outputs(model, labels.shape[1] - start, **inputs), labels[:, start:]


def labelled_logits(model, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """As `labelled_outputs`, always as logits (the full path)."""
    start = _first_predicting(labels)
    logits = model(**inputs, use_cache=False, logits_to_keep=labels.shape[1] - start).logits
    return logits, labels[:, start:]


def _first_predicting(labels: torch.Tensor) -> int:
    """The first position of any row that predicts a label (position t predicts label t + 1)."""
    predicts_label = (labels[:, 1:] != IGNORE_INDEX).any(0)
    return int(predicts_label.int().argmax()) if bool(predicts_label.any()) else 0


def _positions(outputs) -> LastPositions:
    return outputs if isinstance(outputs, LastPositions) else LastPositions(outputs)


def token_cross_entropy(outputs: LastPositions | torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens it sums over.

    `outputs` (logits (batch, seq, vocab), or `labelled_outputs`') at position t predict `labels` at
    t + 1; labels of -100 are not trained. Returning the sum (not the mean) lets the caller divide by
    the token count of the whole accumulated batch, so gradient accumulation weighs every token equally.
    """
    shift_labels = labels[:, 1:]
    scores = _positions(outputs)[:, :-1].scores(shift_labels)
    return -scores.logps.sum(), (shift_labels != IGNORE_INDEX).sum()


def sequence_logps(outputs: LastPositions | torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probabilities of the labelled tokens, their count, and the mean
    logit over them (TRL's `logits/chosen` statistic). Shapes: (batch,), (batch,), (batch,)."""
    labels = labels[:, 1:]
    scores = _positions(outputs)[:, :-1].scores(labels)
    n_tokens = (labels != IGNORE_INDEX).sum(-1)
    return scores.logps.sum(-1), n_tokens, scores.mean_logits.sum(-1) / n_tokens.clamp(min=1)
