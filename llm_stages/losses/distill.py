"""Knowledge distillation: the generalized Jensen-Shannon divergence between a student's and a
teacher's next-token distributions (GKD, Agarwal et al. 2024, eq. 1), computed in chunks of tokens.

    beta = 0: KL(teacher || student)   forward KL, mass-covering (classic distillation)
    beta = 1: KL(student || teacher)   reverse KL, mode-seeking (on-policy distillation)
    else:     beta * KL(teacher || M) + (1 - beta) * KL(student || M),  M = beta * teacher + (1 - beta) * student

The same conventions as TRL's `GKDTrainer.generalized_jsd_loss` (equal to it in tests): both
distributions at `temperature`, the divergence summed over the vocabulary at each token.

`chunked_distillation` never holds a full `[tokens, vocab]` logits tensor of either model: it takes
the last hidden states of the trained positions and runs each model's LM head on `chunk_size`
tokens at a time, inside activation checkpointing, so the backward pass recomputes one chunk's
logits at a time too. Peak memory for the head is `chunk_size x vocab`, not `tokens x vocab`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llm_stages.ranges import FRACTION, POSITIVE, Range

# The allowed range of each of stage=distill's numeric settings (`module.<name>`), checked with the config.
DISTILL_RANGES = {
    "beta": Range(0, 1, note="0: forward KL, 1: reverse KL"),
    "temperature": POSITIVE,
    "lmbda": FRACTION,  # the share of micro-batches answered by the student
    "chunk_size": Range(1, integer=True, note="tokens per LM-head chunk"),
}


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token divergence (n,) between two rows of log-probabilities (n, vocab) each, summed over the vocabulary."""
    if beta == 0:
        return (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
    if beta == 1:
        return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)
    mixture = torch.logsumexp(torch.stack([student_logps + math.log1p(-beta), teacher_logps + math.log(beta)]), 0)
    to_teacher = (teacher_logps.exp() * (teacher_logps - mixture)).sum(-1)
    to_student = (student_logps.exp() * (student_logps - mixture)).sum(-1)
    return beta * to_teacher + (1 - beta) * to_student


def chunked_distillation(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                         student_head: Callable[[torch.Tensor], torch.Tensor],
                         teacher_head: Callable[[torch.Tensor], torch.Tensor], *,
                         beta: float, temperature: float = 1.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed divergence over `n` trained tokens, and how many of them the student's top-1 token
    equals the teacher's. `*_hidden` (n, hidden) are each model's last hidden state at the positions
    that predict a trained token; `*_head` maps them to logits (n, vocab), both over the same vocabulary.
    Gradients reach `student_hidden` (and the student head's weights); the teacher gets none."""
    total = student_hidden.new_zeros((), dtype=torch.float32)
    agree = torch.zeros((), dtype=torch.long, device=student_hidden.device)

    def chunk_divergence(hidden: torch.Tensor, teacher_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        student_logits = student_head(hidden).float()
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_chunk).float()
            same_top1 = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
        student_logps = F.log_softmax(student_logits / temperature, -1)
        teacher_logps = F.log_softmax(teacher_logits / temperature, -1)
        return generalized_jsd(student_logps, teacher_logps, beta).sum(), same_top1

    for start in range(0, student_hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            divergence, same_top1 = checkpoint(chunk_divergence, student_hidden[rows], teacher_hidden[rows],
                                               use_reentrant=False)
        else:
            divergence, same_top1 = chunk_divergence(student_hidden[rows], teacher_hidden[rows])
        total = total + divergence
        agree = agree + same_top1
    return total, agree
