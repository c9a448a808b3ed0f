"""GSPO (sequence-level importance ratio) and CISPO (clipped, detached importance weight) against the
formulas of their papers as TRL 1.16's GRPOTrainer writes them, computed by hand here."""

from __future__ import annotations

import pytest
import torch

from llm_stages.losses.rl import grpo_loss_sum, grpo_per_token_loss, log_importance_weights


def _batch():
    torch.manual_seed(0)
    logprobs = (torch.randn(3, 5, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logprobs.detach() + torch.randn(3, 5, dtype=torch.float64) * 0.2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)
    return logprobs, old, mask, advantages


def test_gspo_ratio_is_the_length_normalised_sequence_ratio_clipped_per_reply():
    logprobs, old, mask, advantages = _batch()
    log_w = log_importance_weights(logprobs, old, mask, "sequence")
    by_hand = torch.stack([((logprobs[i] - old[i]) * mask[i]).sum() / mask[i].sum() for i in range(3)]).unsqueeze(-1)
    torch.testing.assert_close(log_w, by_hand)
    loss, policy, clipped, kl = grpo_per_token_loss(logprobs, old, advantages, mask, epsilon=0.2, epsilon_high=0.28,
                                                    importance_sampling_level="sequence")
    ratio = by_hand.exp()
    expected = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.28)).expand(3, 5)
    torch.testing.assert_close(loss, expected)
    assert kl is None and clipped.shape == (3, 5)
    # Every token of a reply gets the same loss, so its gradient is the reply's mean: padding gets none.
    (loss * mask).sum().backward()
    assert torch.all(logprobs.grad[mask == 0] == 0)


def test_gspo_equals_token_level_for_one_token_replies():
    logprobs, old, _, advantages = _batch()
    one = torch.ones(3, 1, dtype=torch.float64)
    seq = grpo_per_token_loss(logprobs[:, :1], old[:, :1], advantages, one, epsilon=0.2, importance_sampling_level="sequence")[0]
    tok = grpo_per_token_loss(logprobs[:, :1], old[:, :1], advantages, one, epsilon=0.2)[0]
    torch.testing.assert_close(seq, tok)


def test_cispo_clips_the_detached_weight_and_keeps_every_tokens_gradient():
    logprobs, old, mask, advantages = _batch()
    loss, _, clipped, _ = grpo_per_token_loss(logprobs, old, advantages, mask, epsilon=0.2, epsilon_high=1.05, cispo=True)
    ratio = (logprobs - old).exp().detach()
    torch.testing.assert_close(loss, -ratio.clamp(max=1.05) * advantages * logprobs)
    torch.testing.assert_close(clipped, ((ratio > 1.05) & (advantages > 0)).double())
    total, weight = grpo_loss_sum(loss, mask, "cispo", 5)
    assert weight == mask.sum()  # aggregated per token, as TRL's cispo
    total.backward()
    # d/dlogp = -min(r, eps_max) * A: never zero where PPO's clip would cut the gradient.
    torch.testing.assert_close(logprobs.grad, (-ratio.clamp(max=1.05) * advantages) * mask)
    assert torch.all(logprobs.grad[mask == 1] != 0)


def test_unknown_level_is_refused():
    logprobs, old, mask, _ = _batch()
    with pytest.raises(ValueError, match="importance_sampling_level"):
        log_importance_weights(logprobs, old, mask, "reply")
