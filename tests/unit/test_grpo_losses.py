"""GRPO's loss: finite on padding, and equal to TRL 1.16's for every loss_type and scale_rewards."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llm_stages.losses.advantages import group_advantages
from llm_stages.losses.rl import grpo_loss_sum, grpo_per_token_loss, kl_penalty


def test_k3_kl_is_finite_on_a_padded_position_with_logprob_minus_100():
    # Reference log-probs are stored multiplied by the mask (0 on padding); the policy's log-prob of
    # the padding token can be anything, here -100: k3 = exp(0 - (-100)) overflows float32 to inf there.
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -100.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -3.0]]) * mask
    old_way = (kl_penalty(logprobs, ref, "k3") * mask).sum()  # what GRPO did: inf * 0 = NaN
    assert torch.isnan(old_way)

    loss, _, _, kl = grpo_per_token_loss(logprobs, logprobs.detach(), torch.ones(1, 3) * mask, mask, epsilon=0.2,
                                         beta=0.04, ref_logprobs=ref)
    total, weight = grpo_loss_sum(loss, mask, "token_mean", 3)
    (total / weight).backward()
    expected_kl = [torch.expm1(torch.tensor(-0.5)) + 0.5, torch.expm1(torch.tensor(1.0)) - 1.0, 0.0]  # log p - log q: 0.5, -1
    torch.testing.assert_close(kl.detach(), torch.tensor([expected_kl]))
    assert torch.isfinite(total) and torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2] == 0  # padding has no gradient


# -- TRL 1.16 parity -----------------------------------------------------------------------------
# TRL computes advantages inline in `_generate_and_score_completions` (sum_then_normalize): these
# are its lines, with its own `nanstd`. The loss is `GRPOTrainer._compute_loss`, called unbound on a
# stub `self` whose model returns the log-probs we choose.

def _trl_advantages(rewards: torch.Tensor, group: int, scale: str) -> torch.Tensor:
    from trl.trainer.utils import nanstd

    mean_grouped = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    if scale in ["group", "none"]:
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped
    return advantages / (std + 1e-4) if scale != "none" else advantages


def _trl_loss(logprobs, old, ref, advantages, mask, *, loss_type, beta, epsilon, epsilon_high, max_completion_length):
    from trl.trainer.grpo_trainer import GRPOTrainer

    identity = lambda t, *_, **__: t  # noqa: E731
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *_, **__: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=identity, reduce=identity, gather_for_metrics=identity, num_processes=1,
                                    sync_gradients=True))
    n, width = logprobs.shape
    inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.ones(n, width, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("scale", ["none", "group", "batch"])
@pytest.mark.parametrize("ours,trl", [("token_mean", "bnpo"), ("sequence_mean", "grpo"), ("dr_grpo", "dr_grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(scale, ours, trl, beta):
    g = torch.Generator().manual_seed(0)
    group, n, width, max_len = 4, 8, 6, 7
    rewards = torch.randint(0, 3, (n,), generator=g).float() + torch.rand(n, generator=g)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 6])
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    old = -torch.rand(n, width, generator=g) * 3
    ref = -torch.rand(n, width, generator=g) * 3
    base = old + torch.randn(n, width, generator=g) * 0.3  # ratios clipped on both sides

    advantages = group_advantages(rewards, group, scale=scale)
    torch.testing.assert_close(advantages, _trl_advantages(rewards, group, scale))

    theirs_lp = base.clone().requires_grad_(True)
    theirs = _trl_loss(theirs_lp, old, ref, advantages, mask, loss_type=trl, beta=beta, epsilon=0.2,
                       epsilon_high=0.28, max_completion_length=max_len)
    theirs.backward()
    ours_lp = base.clone().requires_grad_(True)
    per_token, *_ = grpo_per_token_loss(ours_lp, old, advantages[:, None] * mask, mask, epsilon=0.2, epsilon_high=0.28,
                                        beta=beta, ref_logprobs=ref * mask)
    total, weight = grpo_loss_sum(per_token, mask, ours, max_len)
    (total / weight).backward()
    torch.testing.assert_close(total / weight, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=1e-6, atol=1e-8)
    assert abs(theirs.item()) > 1e-3  # a loss that tells the types apart


def test_scale_rewards_batch_uses_the_std_of_all_ranks():
    rewards, other_rank = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([2.0, 2.0, 5.0, 1.0])
    everything = torch.cat([rewards, other_rank])
    # An all-reduce of (count, sum, sum of squares around the global mean): the other rank's terms added.
    theirs = iter([other_rank.numel(), other_rank.sum(), ((other_rank - everything.mean()) ** 2).sum()])
    advantages = group_advantages(rewards, 4, scale="batch", reduce=lambda x: x + next(theirs))
    torch.testing.assert_close(advantages, (rewards - rewards.mean()) / (everything.std() + 1e-4))
