"""The generalized JSD of distillation: TRL's GKD loss on the same logits, hand-computed divergences,
and the chunked LM-head path equal to the full-logits one in value and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm_stages.losses.distill import chunked_distillation, generalized_jsd


def _trl_gkd(student_logits, teacher_logits, labels, beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                           temperature=temperature)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_trls_gkd_loss(beta, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 7, 50), torch.randn(3, 7, 50)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = labels[2, 5:] = -100
    mask = labels != -100
    ours = generalized_jsd(F.log_softmax(student[mask] / temperature, -1), F.log_softmax(teacher[mask] / temperature, -1),
                           beta).sum() / mask.sum()
    torch.testing.assert_close(ours, _trl_gkd(student, teacher, labels, beta, temperature), rtol=1e-6, atol=1e-6)


def test_hand_computed_divergences():
    p_student, p_teacher = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    s, t = p_student.log(), p_teacher.log()
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(teacher || student)
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(student || teacher)
    m = [0.5 * 0.5 + 0.5 * 0.9, 0.5 * 0.5 + 0.5 * 0.1]
    jsd = 0.5 * (0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])) + 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(forward, abs=1e-6)
    assert generalized_jsd(s, t, 1.0).item() == pytest.approx(reverse, abs=1e-6)
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(jsd, abs=1e-6)
    assert generalized_jsd(t, t, 0.3).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_equals_full_logits_in_value_and_gradient(beta, chunk_size):
    torch.manual_seed(1)
    student_head, teacher_head = torch.nn.Linear(16, 40, bias=False), torch.nn.Linear(24, 40, bias=False)
    hidden = torch.randn(11, 16, requires_grad=True)
    teacher_hidden = torch.randn(11, 24)

    full = generalized_jsd(F.log_softmax(student_head(hidden) / 0.8, -1),
                           F.log_softmax(teacher_head(teacher_hidden) / 0.8, -1).detach(), beta).sum()
    full_grads = torch.autograd.grad(full, [hidden, student_head.weight])

    chunked, agree = chunked_distillation(hidden, teacher_hidden, student_head, teacher_head, beta=beta,
                                          temperature=0.8, chunk_size=chunk_size)
    chunked_grads = torch.autograd.grad(chunked, [hidden, student_head.weight])
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    expected_agree = (student_head(hidden).argmax(-1) == teacher_head(teacher_hidden).argmax(-1)).sum()
    assert int(agree) == int(expected_agree)
    assert teacher_head.weight.grad is None
