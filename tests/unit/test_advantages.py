"""The critic-free advantage estimators and DAPO's pieces against hand-computed numbers (the
arithmetic is in the comments) and the reference implementations' formulas."""

import math

import pytest
import torch

from llm_stages.rollout.dynamic_sampling import fill_informative_groups, informative_groups
from llm_stages.errors import ConfigError
from llm_stages.losses.advantages import (AdvantageInputs, AdvantageSettings, advantage_settings, discounted_returns,
                                          group_advantages, grpo, reinforce_pp, reinforce_pp_baseline, rloo)
from llm_stages.rollout.overlong import overlong_penalty
from llm_stages.rollout.rollout import Replies, Sample, Scores


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def _direct_grpo(scores, group, scale, mask):
    """GRPO's advantages written out directly, line for line: what the registry's `grpo` must equal."""
    grouped = scores.view(-1, group)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        n, total = scores.numel(), scores.sum()
        centred = centred / ((((scores - total / n) ** 2).sum() / (n - 1)).sqrt() + 1e-4)
    return centred.reshape(-1)[:, None] * mask


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_is_bit_identical_to_the_direct_formula(scale):
    g = torch.Generator().manual_seed(0)
    scores, mask = torch.rand(12, generator=g) * 3, (torch.rand(12, 5, generator=g) > 0.3).long()
    ours = AdvantageSettings("grpo", scale_rewards=scale).compute(AdvantageInputs(scores, mask, 4))
    assert torch.equal(ours, _direct_grpo(scores, 4, scale, mask))
    assert torch.equal(ours, group_advantages(scores, 4, scale=scale)[:, None] * mask)


def test_rloo_leave_one_out_by_hand():
    # group [1, 0, 4]: baselines mean(0, 4) = 2, mean(1, 4) = 2.5, mean(1, 0) = 0.5 -> -1, -2.5, 3.5
    # group [2, 2, 2]: every baseline 2 -> 0
    scores, mask = t([1, 0, 4, 2, 2, 2]), torch.tensor([[1, 1, 0]] * 6)
    advantages = rloo(AdvantageInputs(scores, mask, 3))
    torch.testing.assert_close(advantages[:, 0], t([-1, -2.5, 3.5, 0, 0, 0]))
    assert (advantages[:, 2] == 0).all()  # padding


def test_rloo_is_n_over_n_minus_1_times_the_centred_reward():
    scores, n = torch.rand(20, generator=torch.Generator().manual_seed(1)), 5
    grouped = scores.view(-1, n)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    torch.testing.assert_close(rloo(AdvantageInputs(scores, torch.ones(20, 1), n))[:, 0], n / (n - 1) * centred)


def test_discounted_returns_by_hand():
    # rewards [-0.01, 0.02, 0.97], gamma 0.5: G2 = 0.97, G1 = 0.02 + 0.485 = 0.505, G0 = -0.01 + 0.2525 = 0.2425
    # a padded row: rewards past the mask never flow back
    rewards, mask = t([[-0.01, 0.02, 0.97], [1.0, 2.0, 50.0]]), t([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), t([[0.2425, 0.505, 0.97], [2.0, 2.0, 0.0]]))


def test_reinforce_pp_by_hand():
    # scores [1, -1], k1 KL per token, kl_coef 0.1:
    # token rewards row 0: [-0.01, +0.02, -0.03 + 1] = [-0.01, 0.02, 0.97]; row 1: [-0.05, 0 - 1] = [-0.05, -1.0]
    # returns (gamma 1): row 0 [0.98, 0.99, 0.97]; row 1 [-1.05, -1.0]
    # whitened over the 5 valid tokens: mean 0.89 / 5 = 0.178; squared deviations 0.802^2 + 0.812^2 + 0.792^2
    # + 1.228^2 + 1.178^2 = 4.82548; unbiased variance 4.82548 / 4 = 1.20637
    mask = t([[1, 1, 1], [1, 1, 0]])
    kl = t([[0.1, -0.2, 0.3], [0.5, 0.0, 0.0]])
    advantages = reinforce_pp(AdvantageInputs(t([1, -1]), mask, 2, kl), kl_coef=0.1)
    returns = t([[0.98, 0.99, 0.97], [-1.05, -1.0, 0.178]])
    torch.testing.assert_close(advantages, (returns - 0.178) / math.sqrt(1.20637) * mask, atol=1e-5, rtol=1e-5)


def test_reinforce_pp_baseline_by_hand():
    # group [3, 1]: centred [1, -1]; the last-token reward's return (gamma 1) on every token: [1, 1] and [-1]
    # whitened over 3 tokens: mean 1/3, deviations 2/3, 2/3, -4/3, variance (4 + 4 + 16) / 9 / 2 = 4/3
    mask = t([[1, 1], [1, 0]])
    advantages = reinforce_pp_baseline(AdvantageInputs(t([3, 1]), mask, 2))
    s = math.sqrt(4 / 3)
    torch.testing.assert_close(advantages, t([[2 / 3 / s, 2 / 3 / s], [-4 / 3 / s, 0]]))


def _verl_reinforce_pp(token_rewards, mask, gamma):
    """verl core_algos.compute_reinforce_plus_plus_outcome_advantage, restated: the running return,
    reset after EOS, then masked_whiten (unbiased variance, rsqrt(var + 1e-8))."""
    returns, running = torch.zeros_like(token_rewards), 0
    for step in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, step] + gamma * running
        returns[:, step] = running
        running = running * mask[:, step]
    mean = (returns * mask).sum() / mask.sum()
    var = (((returns - mean) ** 2) * mask).sum() / (mask.sum() - 1)
    return (returns - mean) * torch.rsqrt(var + 1e-8) * mask


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_equals_verl_and_openrlhf_token_rewards(gamma):
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = (torch.arange(5)[None] < lengths[:, None]).float()
    scores, kl = torch.randn(6, generator=g), torch.randn(6, 5, generator=g) * 0.1 * mask
    # OpenRLHF compute_reward: -kl_coef * kl on every action, the score added at the EOS position.
    token_rewards = -0.05 * kl
    token_rewards[torch.arange(6), lengths - 1] += scores
    ours = reinforce_pp(AdvantageInputs(scores, mask, 2, kl), kl_coef=0.05, gamma=gamma)
    torch.testing.assert_close(ours, _verl_reinforce_pp(token_rewards, mask, gamma))
    # The baseline variant without KL equals verl's reinforce_plus_plus_baseline: the centred score on every token, whitened.
    grouped = scores.view(-1, 2)
    tiled = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)[:, None] * mask
    torch.testing.assert_close(reinforce_pp_baseline(AdvantageInputs(scores, mask, 2)),
                               _verl_reinforce_pp(torch.where(torch.arange(5)[None] == (lengths - 1)[:, None], tiled, 0),
                                                  mask, 1.0))


def test_whitening_ignores_padding():
    mask = t([[1, 1, 0, 0], [1, 0, 0, 0]])
    inputs = AdvantageInputs(t([2, -1]), mask, 2, t([[0.1, 0.2, 0, 0], [0.3, 0, 0, 0]]))
    garbage = inputs._replace(kl=inputs.kl + t([[0, 0, 1e6, -7], [0, 3, 5, 1e4]]))  # whatever sits on padding
    for estimator in (reinforce_pp, reinforce_pp_baseline):
        clean = estimator(inputs, kl_coef=0.1)
        assert torch.equal(clean, estimator(garbage, kl_coef=0.1))
        assert (clean[mask == 0] == 0).all()
        assert clean[mask == 1].mean().abs() < 1e-6 and clean[mask == 1].std().sub(1).abs() < 1e-5


def test_settings_refuse_nonsense_in_one_line():
    with pytest.raises(ConfigError, match="expected one of grpo, rloo, reinforce_pp, reinforce_pp_baseline"):
        AdvantageSettings("ppo")
    with pytest.raises(ConfigError, match="use module.beta"):
        AdvantageSettings("rloo", kl_coef=0.1)
    with pytest.raises(ConfigError, match="both penalise the KL"):
        advantage_settings({"advantage": "reinforce_pp", "kl_coef": 0.1}, beta=0.04)
    with pytest.raises(ConfigError, match=r"module.gamma=0: expected a number in \(0, 1\]"):
        AdvantageSettings("reinforce_pp", gamma=0)
    assert advantage_settings({"scale_rewards": False}).scale_rewards == "none"  # TRL's older boolean


def test_overlong_penalty_by_hand():
    # max 10, buffer 4: free up to 6 tokens; 7 -> (6 - 7) / 4 = -0.25; 9 -> -0.75; 10 -> -1; 12 -> -1 (beyond)
    penalty = overlong_penalty(torch.tensor([3, 6, 7, 9, 10, 12]), max_length=10, buffer=4, factor=0.5)
    torch.testing.assert_close(penalty, 0.5 * t([0, 0, -0.25, -0.75, -1, -1]))


# -- dynamic sampling on fake rollouts: no model ---------------------------------------------------
def _replies(scores: list[float], tag: str, prompt_width: int, reply_width: int) -> Replies:
    n = len(scores)
    ids = torch.arange(n)[:, None]
    sample = Sample(ids.expand(n, prompt_width).clone(), torch.ones(n, prompt_width, dtype=torch.long),
                    ids.expand(n, reply_width).clone(), torch.ones(n, reply_width, dtype=torch.long), -torch.ones(n, reply_width),
                    torch.zeros(n, reply_width, dtype=torch.long))
    total = t(scores)
    return Replies(sample, Scores(total, {"correct": total * 2}, [f"{tag}{i}" for i in range(n)]),
                   [f"{tag}{i // 2}" for i in range(n)], 1.0)


ROUNDS = [_replies([1, 1, 0, 1, 2, 2], "a", 2, 3),  # informative: group 1
          _replies([0, 0, 3, 4, 5, 5], "b", 3, 2),  # group 1
          _replies([1, 0, 1, 1, 0, 1], "c", 1, 4)]  # groups 0 and 2


def test_informative_groups():
    assert informative_groups(t([1, 1, 0, 1, 2, 2]), 2).tolist() == [False, True, False]


def test_dynamic_sampling_fills_from_the_next_prompts():
    calls = []
    filled = fill_informative_groups(ROUNDS[0], lambda r: calls.append(r) or ROUNDS[r], group_size=2, max_extra_rounds=5,
                                     pad_token_id=-1)
    assert calls == [1, 2]  # stopped once 3 informative groups were in hand (4 found, the first 3 kept)
    assert (filled.kept_groups, filled.dropped_groups, filled.extra_rounds) == (3, 2 + 2 + 1, 2)
    assert filled.replies.prompts == ["a1", "a1", "b1", "b1", "c0", "c0"]
    assert filled.replies.scores.total.tolist() == [0, 1, 3, 4, 1, 0]
    assert filled.replies.scores.components["correct"].tolist() == [0, 2, 6, 8, 2, 0]
    assert filled.replies.scores.completions == ["a2", "a3", "b2", "b3", "c0", "c1"]
    assert filled.replies.generation_seconds == 3.0
    sample = filled.replies.sample
    # prompts left-padded to the widest (3), replies right-padded to the widest (4)
    assert sample.query.tolist()[0] == [-1, 2, 2] and sample.query_mask.tolist()[0] == [0, 1, 1]
    assert sample.response.tolist()[2] == [2, 2, -1, -1] and sample.response_mask.tolist()[2] == [1, 1, 0, 0]
    assert sample.sampled_logprobs.tolist()[2] == [-1, -1, 0, 0]


def test_dynamic_sampling_cap_then_dropped_groups_fill():
    filled = fill_informative_groups(ROUNDS[0], lambda r: ROUNDS[r], group_size=2, max_extra_rounds=1, pad_token_id=-1)
    assert (filled.kept_groups, filled.dropped_groups, filled.extra_rounds) == (2, 4, 1)
    assert filled.replies.prompts == ["a1", "a1", "b1", "b1", "a0", "a0"]  # the first dropped group fills the batch
    ended = fill_informative_groups(ROUNDS[0], lambda r: None, group_size=2, max_extra_rounds=3, pad_token_id=-1)
    assert (ended.kept_groups, ended.extra_rounds) == (1, 0)  # no prompts left in the epoch: train on what there is
    assert len(ended.replies.prompts) == 6


def test_dynamic_sampling_keeps_a_full_batch_as_it_is():
    full = _replies([0, 1, 2, 3], "a", 2, 2)
    filled = fill_informative_groups(full, lambda r: pytest.fail("sampled more"), group_size=2, max_extra_rounds=3,
                                     pad_token_id=-1)
    assert (filled.kept_groups, filled.dropped_groups, filled.extra_rounds) == (2, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(filled.replies.sample, full.sample))


def test_grpo_loss_takes_per_token_or_per_reply_advantages():
    from llm_stages.losses.rl import grpo_per_token_loss

    g = torch.Generator().manual_seed(3)
    logprobs, old = -torch.rand(4, 3, generator=g), -torch.rand(4, 3, generator=g)
    per_reply, mask = torch.randn(4, 1, generator=g), torch.ones(4, 3)
    broadcast = grpo_per_token_loss(logprobs, old, per_reply, mask, epsilon=0.2)[0]
    assert torch.equal(broadcast, grpo_per_token_loss(logprobs, old, per_reply.expand(4, 3), mask, epsilon=0.2)[0])
    per_token = per_reply.expand(4, 3) * t([1.0, 0.5, -1.0])  # reinforce_pp's advantages differ along a reply
    torch.testing.assert_close(grpo_per_token_loss(logprobs, old, per_token, mask, epsilon=0.2)[0][:, 1],
                               grpo_per_token_loss(logprobs[:, 1:2], old[:, 1:2], per_token[:, 1:2], mask[:, :1], epsilon=0.2)[0][:, 0])
