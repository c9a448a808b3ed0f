"""A frozen teacher beside the trained model: `stage=distill`, and the RL stages' dense distillation
reward (`module.distill_coef`). Student and teacher compare token distributions id by id, so they
must share a vocabulary; a tokenizer that is the other's with tokens added at the end is aligned on
the ids both have."""

from __future__ import annotations

import logging

import torch

from llm_stages.errors import ConfigError
from llm_stages.models import load_model, load_tokenizer

log = logging.getLogger(__name__)


def load_teacher(teacher_cfg, tokenizer) -> tuple[torch.nn.Module, int | None]:
    """The teacher `teacher_cfg` names (any model config), frozen in eval mode, and the vocabulary size
    to compare logits over (None: every row of both heads; see `shared_vocabulary`)."""
    teacher_tokenizer = load_tokenizer(teacher_cfg)
    vocab_size = shared_vocabulary(tokenizer, teacher_tokenizer, teacher_cfg)
    return load_model(teacher_cfg, teacher_tokenizer).eval().requires_grad_(False), vocab_size


def shared_vocabulary(student_tokenizer, teacher_tokenizer, teacher_cfg) -> int | None:
    """None when the two tokenizers are the same (logits compared over every row of the heads); else
    the number of leading ids both tokenizers map to the same tokens (logits compared over those)."""
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student == teacher:
        return None
    shared = min(len(student_tokenizer), len(teacher_tokenizer))
    by_id = lambda vocab: {i: t for t, i in vocab.items() if i < shared}  # noqa: E731
    if by_id(student) != by_id(teacher):
        raise ConfigError(f"module.teacher ({teacher_cfg.get('path') or teacher_cfg.get('name')}) has a vocabulary of "
                          f"{len(teacher_tokenizer)} tokens and the student {len(student_tokenizer)}, and they differ on "
                          "shared ids: distillation compares token distributions id by id, so both need the same "
                          "tokenizer (tokens added at the end of one are fine)")
    log.info("distill: student %d and teacher %d tokens; compared over the %d ids both have",
             len(student_tokenizer), len(teacher_tokenizer), shared)
    return shared
