"""GAE over an episode: the tokens an environment added between turns are skipped, as if absent."""

import torch

from llm_stages.losses.rl import gae


def test_gae_over_an_episode_equals_gae_over_its_policy_tokens_alone():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # row 1: one turn, then padding
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    advantages, returns = gae(rewards * mask, values, mask, gamma=0.9, lam=0.8)
    for row in range(2):
        kept = mask[row].bool()
        alone, alone_returns = gae(rewards[row][kept][None], values[row][kept][None], torch.ones(1, int(kept.sum())),
                                   gamma=0.9, lam=0.8)
        torch.testing.assert_close(advantages[row][kept], alone[0])
        torch.testing.assert_close(returns[row][kept], alone_returns[0])
        assert (advantages[row][~kept] == 0).all() and (returns[row][~kept] == 0).all()


def test_gae_by_hand_across_a_tool_turn():
    # policy tokens at 0 and 3 (1, 2: a tool result); reward 1 on the last; gamma 1, lam 1
    mask = torch.tensor([[1, 0, 0, 1]])
    values = torch.tensor([[0.5, 9.0, 9.0, 0.25]])  # the tool tokens' values are never read
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_3 = 1 - 0.25 = 0.75; A_0 = 0 + V_3 - V_0 + A_3 = 0.25 - 0.5 + 0.75 = 0.5
    assert advantages.tolist() == [[0.5, 0.0, 0.0, 0.75]]
