"""RL pure functions against hand-computed numbers (the arithmetic is in the comments)."""

import math

import pytest
import torch

from llm_stages.losses.advantages import group_advantages
from llm_stages.losses.rl import (KLController, approx_kl, clipped_policy_loss, clipped_value_loss,
                                  entropy_from_logits, explained_variance, gae, kl_penalty, masked_mean,
                                  shaped_rewards, whiten)


def t(*rows):
    """A float64 tensor: one list -> 1-D, several -> 2-D."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float64)


def batch(row):
    return t(row).unsqueeze(0)


def test_gae_four_steps_no_padding():
    # gamma 0.9, lam 0.5; delta_t = r_t + 0.9 V_{t+1} - V_t (V_4 = 0); A_t = delta_t + 0.45 A_{t+1}
    # t3: 1 - 0.8 = 0.2 | t2: 0.72 - 0.7 = 0.02 -> 0.02 + 0.45*0.2 = 0.11
    # t1: 0.63 - 0.6 = 0.03 -> 0.03 + 0.45*0.11 = 0.0795 | t0: 0.54 - 0.5 = 0.04 -> 0.04 + 0.45*0.0795 = 0.075775
    advantages, returns = gae(batch([0, 0, 0, 1.0]), batch([0.5, 0.6, 0.7, 0.8]), batch([1, 1, 1, 1]), gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, batch([0.075775, 0.0795, 0.11, 0.2]))
    torch.testing.assert_close(returns, batch([0.575775, 0.6795, 0.81, 1.0]))


def test_gae_terminal_masking_ignores_padding():
    # The reply ends at t2; t3 is padding holding garbage reward 5 and value 9, which must not leak.
    # t2: 1 + 0 - 0.7 = 0.3 | t1: 0.63 - 0.6 + 0.45*0.3 = 0.165 | t0: 0.54 - 0.5 + 0.45*0.165 = 0.11425
    advantages, returns = gae(batch([0, 0, 1.0, 5.0]), batch([0.5, 0.6, 0.7, 9.0]), batch([1, 1, 1, 0]), gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, batch([0.11425, 0.165, 0.3, 0.0]))
    torch.testing.assert_close(returns, batch([0.61425, 0.765, 1.0, 0.0]))


def test_gae_rows_are_independent():
    rewards, values = t([0, 0, 0, 1.0], [0, 0, 1.0, 5.0]), t([0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 0.7, 9.0])
    advantages, _ = gae(rewards, values, t([1, 1, 1, 1], [1, 1, 1, 0]), gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, t([0.075775, 0.0795, 0.11, 0.2], [0.11425, 0.165, 0.3, 0.0]))


def test_whiten_uses_masked_unbiased_statistics():
    # [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    std = math.sqrt(5 / 3)
    torch.testing.assert_close(whiten(t([1, 2, 3, 4.0]), t([1, 1, 1, 1])),
                               t([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std]), atol=1e-6, rtol=0)
    # masked [1, 2, 3]: mean 2, var 1; the padded 100 is ignored and returned as 0
    torch.testing.assert_close(whiten(t([1, 2, 3, 100.0]), t([1, 1, 1, 0])), t([-1, 0, 1, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(whiten(t([1, 2, 3, 100.0]), t([1, 1, 1, 0]), shift_mean=False), t([1, 2, 3, 0.0]),
                               atol=1e-6, rtol=0)


def test_whiten_reduces_over_ranks():
    # Two "ranks" holding [1, 2] and [3, 4] whiten like one batch [1, 2, 3, 4] when sums are reduced.
    full = whiten(t([1, 2, 3, 4.0]), t([1, 1, 1, 1]))
    # This rank holds [1, 2]; the other holds [3, 4] and contributes, in the order whiten reduces:
    # its count 2, its sum 7, and its squared deviations from the global mean 2.5: 0.25 + 2.25.
    from_other_rank = iter([2.0, 7.0, 2.5])
    reduce = lambda x: x + next(from_other_rank)  # noqa: E731
    torch.testing.assert_close(whiten(t([1, 2.0]), t([1, 1]), reduce=reduce), full[:2])


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -1.0])  # log ratios +1 and -1
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([1.0, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t([0.5, 0.5]))
    # k3 = q/p - 1 - log(q/p): e^-1 - 1 + 1 = 0.367879..., e^1 - 1 - 1 = 0.718281...
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t([math.exp(-1), math.e - 2]))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_shaped_rewards_put_the_score_on_the_last_reply_token():
    # -0.5 * kl everywhere, + score 2 on t2 (the last unmasked token); padding gets nothing
    rewards = shaped_rewards(t([2.0]), batch([0.1, 0.2, 0.3, 0.7]), batch([1, 1, 1, 0]), kl_coef=0.5)
    torch.testing.assert_close(rewards, batch([-0.05, -0.1, 1.85, 0.0]))


def test_clipped_policy_loss():
    # ratios 1.5, 0.5, 1.0, 0.5 with advantages 1, 1, -2, -1 and cliprange 0.2:
    # t0: max(-1.5, -1.2) = -1.2 (clipped) | t1: max(-0.5, -0.8) = -0.5 | t2: 2 | t3: max(0.5, 0.8) = 0.8 (clipped)
    logprobs = torch.log(t([1.5, 0.5, 1.0, 0.5]))
    loss, clipped = clipped_policy_loss(logprobs, torch.zeros(4, dtype=torch.float64), t([1, 1, -2, -1.0]), 0.2)
    torch.testing.assert_close(loss, t([-1.2, -0.5, 2.0, 0.8]))
    torch.testing.assert_close(clipped, t([1, 0, 0, 1.0]))
    # clip-higher: the upper bound 1.3 -> t0 max(-1.5, -1.3) = -1.3
    loss, _ = clipped_policy_loss(logprobs, torch.zeros(4, dtype=torch.float64), t([1, 1, -2, -1.0]), 0.2, 0.3)
    torch.testing.assert_close(loss[0], torch.tensor(-1.3, dtype=torch.float64))
    torch.testing.assert_close(approx_kl(logprobs, torch.zeros(4, dtype=torch.float64)), 0.5 * logprobs ** 2)


def test_clipped_value_loss():
    # t0: V 1.0, old 0.5, R 2: unclipped (1-2)^2 = 1, clipped V 0.7 -> 1.69 -> 0.5 * 1.69 = 0.845
    # t1: V 2.0, old 2.0, R 0: both 4 -> 2.0
    loss, clipped = clipped_value_loss(t([1.0, 2.0]), t([0.5, 2.0]), t([2.0, 0.0]), 0.2)
    torch.testing.assert_close(loss, t([0.845, 2.0]))
    torch.testing.assert_close(clipped, t([1.0, 0.0]))


def test_group_advantages():
    rewards = t([1, 0, 0, 0, 2, 2, 2, 2.0])
    # group 1: mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5; group 2: all equal -> 0
    expected = t([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / t([0.5001] * 4 + [1.0001] * 4)
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), t([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_masked_mean_entropy_explained_variance():
    assert masked_mean(t([1, 2, 30.0]), t([1, 1, 0])).item() == 1.5
    torch.testing.assert_close(entropy_from_logits(torch.zeros(1, 2)), torch.tensor([math.log(2)]))
    returns, mask = t([1, 2, 3, 4.0]), t([1, 1, 1, 1])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)


def test_kl_controller():
    fixed = KLController(0.1)
    fixed.update(50.0, 100)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=10000)
    adaptive.update(12.0, 100)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 100 / 10000)
    assert adaptive.value == pytest.approx(0.1002)
    adaptive.update(3.0, 100)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.1002 * (1 - 0.002))
    restored = KLController(0.5, target=6.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
