"""Pairwise reward-model loss (Bradley-Terry), as in InstructGPT and the seeds."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                         margin: torch.Tensor | float = 0.0, center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair loss `-logsigmoid(r_chosen - r_rejected - margin)`, plus
    `center_rewards_coefficient * (r_chosen + r_rejected)^2` which keeps rewards centred on zero
    (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`)."""
    losses = -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float() - margin)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards.float() + rejected_rewards.float()) ** 2
    return losses
