import math

import torch

from llm_stages.losses.reward import pairwise_reward_loss
from llm_stages.stages.reward import reward_report


def test_pairwise_reward_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    losses = pairwise_reward_loss(chosen, rejected)
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))]  # -log sigmoid(x) = log(1 + e^-x)
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    with_margin = pairwise_reward_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]), center_rewards_coefficient=0.1)
    expected = [math.log(1 + math.exp(-0.5)) + 0.1 * 9.0, math.log(1 + math.exp(1.0)) + 0.1 * 1.0]
    assert torch.allclose(with_margin, torch.tensor(expected), atol=1e-6)


def test_reward_report_calibration_and_length_bias():
    # margins 3, 3, -3, 0.1: confidences sigmoid(3)=0.9526 (x3, two correct), sigmoid(0.1)=0.525 (correct)
    chosen = torch.tensor([3.0, 3.0, 0.0, 0.1])
    rejected = torch.tensor([0.0, 0.0, 3.0, 0.0])
    chosen_len = torch.tensor([10.0, 10.0, 4.0, 5.0])
    rejected_len = torch.tensor([5.0, 5.0, 8.0, 5.0])
    report = reward_report(chosen, rejected, chosen_len, rejected_len, bins=10)
    s3, s01 = 1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-0.1))
    # bin of 0.9526 holds 3 pairs with accuracy 2/3; bin of 0.525 holds 1 pair with accuracy 1
    expected_ece = 0.75 * abs(2 / 3 - s3) + 0.25 * abs(1 - s01)
    assert math.isclose(report["calibration_ece"], expected_ece, rel_tol=1e-5)
    assert report["length_bias/accuracy_chosen_longer"] == 1.0  # pairs 0, 1
    assert report["length_bias/accuracy_chosen_shorter"] == 0.0  # pair 2
    rewards = torch.cat([chosen, rejected])
    lengths = torch.cat([chosen_len, rejected_len])
    assert math.isclose(report["length_bias/reward_length_corr"], torch.corrcoef(torch.stack([rewards, lengths]))[0, 1].item(), rel_tol=1e-6)
