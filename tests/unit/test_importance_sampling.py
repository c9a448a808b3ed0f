"""Truncated importance sampling for vLLM-sampled replies (losses.rl.importance_weights): TRL 1.16's
`vllm_importance_sampling_correction` ratios, for each mode, on the same tensors."""

import pytest
import torch

from llm_stages.losses.rl import importance_weights


def trl_ratio(old, sampled, mask, mode, cap):
    """grpo_trainer.py (TRL 1.16) `_generate_and_score_completions`, the importance-sampling block."""
    diff = torch.nan_to_num((old - sampled) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, max=cap)
    return ratio.masked_fill(ratio > cap, value=0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_weights_equal_trl(mode):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).float()
    old = -torch.rand(3, 4) * 3
    sampled = old + torch.randn(3, 4) * 0.6  # some ratios above the cap, some below 1
    weights, capped = importance_weights(old, sampled, mask, mode=mode, cap=1.5)
    expected = trl_ratio(old, sampled, mask, mode, 1.5).expand(3, 4) * mask
    torch.testing.assert_close(weights, expected)
    assert not weights.requires_grad and (weights[mask == 0] == 0).all()
    assert capped.sum() > 0 and (capped[mask == 0] == 0).all()


def test_same_sampler_and_trainer_is_no_correction():
    logprobs = -torch.rand(2, 5)
    mask = torch.ones(2, 5)
    weights, capped = importance_weights(logprobs, logprobs.clone(), mask)
    assert torch.equal(weights, mask) and capped.sum() == 0


def test_weights_carry_no_gradient_and_scale_the_policy_gradient():
    old = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    sampled = torch.tensor([[-1.5, -1.0]])  # ratios e^0.5 (1.65) and e^-1 (0.37)
    weights, _ = importance_weights(old, sampled, torch.ones(1, 2), cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, -1.0]]).exp())
    (weights * old).sum().backward()
    torch.testing.assert_close(old.grad, weights)  # the weights are constants of the loss
