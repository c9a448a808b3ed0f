"""Pure functions of RL from feedback (PPO, GRPO), on (batch, response_tokens) tensors (the critic-free
advantage estimators: llm_stages.losses.advantages).

`mask` is 1 on response tokens (up to and including EOS) and 0 on padding after the response.
Per-token functions return unreduced tensors; `masked_mean` reduces. `reduce`, where taken, sums
a tensor over data-parallel ranks (identity on one process), so statistics that normalise a
batch (whitening) see the whole global batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from llm_stages.ranges import FRACTION, NON_NEGATIVE, POSITIVE, Range

Reduce = Callable[[torch.Tensor], torch.Tensor]

# The allowed range of each of the RL stages' numeric settings (`module.<name>`), checked with the config.
_SHARED_RANGES = {
    "ppo_epochs": Range(1, integer=True),
    "mini_batch_size": Range(1, integer=True),
    "micro_batch_size": Range(1, integer=True, nullable=True, note="null: the whole minibatch"),
    "gamma": Range(0, 1, low_open=True),  # the discount of future rewards
    "distill_coef": NON_NEGATIVE,  # the weight of the reverse KL to module.teacher in each token's reward
    "share_prompt_min_saving": FRACTION,  # share_prompt=auto: the fraction of tokens forwarding each prompt once must save
}
PPO_RANGES = {
    **_SHARED_RANGES,
    "kl_coef": NON_NEGATIVE,  # a negative coefficient would reward drifting from the reference
    "kl_target": Range(0, low_open=True, nullable=True, note="null: a fixed kl_coef"),
    "kl_horizon": Range(1),
    "reward_clip": Range(0, low_open=True, nullable=True, note="null: no clipping"),
    "cliprange": POSITIVE,  # the ratio is clipped to [1 - cliprange, 1 + cliprange]: 0 or less stops every update
    "cliprange_value": POSITIVE,
    "vf_coef": NON_NEGATIVE,
    "lam": FRACTION,  # GAE's lambda
}
GRPO_RANGES = {
    **_SHARED_RANGES,
    "num_generations": Range(2, integer=True, note="advantages compare the replies within a group"),
    "beta": NON_NEGATIVE,  # the k3 KL term's weight (0: none)
    "epsilon": POSITIVE,  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    "epsilon_high": Range(0, low_open=True, nullable=True, note="null: = epsilon"),
    "kl_coef": NON_NEGATIVE,
}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _identity) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (Bessel-corrected) variance of the masked entries, over all ranks."""
    n, total = reduce(mask.sum().float()), reduce((x * mask).sum().float())
    mean = total / n.clamp(min=1)
    squares = reduce((((x - mean) ** 2) * mask).sum().float())
    return mean, squares / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce = _identity,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; `shift_mean=False` keeps the mean (scales only).
    Padding positions are returned as 0."""
    mean, var = masked_mean_var(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1, k2, k3).
    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2;
    k3 = q/p - 1 - log(q/p) (unbiased, always >= 0, lower variance).
    With `mask`, padding positions are 0: masked before the exponential, because a padded
    log-prob of -100 would make k3 = exp(100) = inf there, and inf * 0 is NaN (in the gradient too)."""
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every response token, plus the sequence score on the last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()  # the last response token
    return rewards + last * scores[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the tokens the policy sampled (`mask`).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}, where t+1 is the
    next masked token: the tokens an environment added between an episode's turns are skipped, as
    steps the policy did not take (their values are neither used nor trained). The episode ends at
    the last masked token: past it there is no next value and no future advantage (so values or
    rewards of padding never leak in). Returns (advantages, returns = A + V), both 0 off the mask.
    """
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        sampled = mask[:, t].bool()
        advantage = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        advantages[:, t] = advantage * sampled
        next_advantage = torch.where(sampled, advantage, next_advantage)
        next_value = torch.where(sampled, values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        cliprange: float, cliprange_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token clipped surrogate loss max(-A * r, -A * clip(r, 1 - eps, 1 + eps_high)),
    r = exp(logp - old_logp), and a per-token flag of where clipping was active (for clipfrac)."""
    ratio = torch.exp(logprobs - old_logprobs)
    high = cliprange if cliprange_high is None else cliprange_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(unclipped.dtype)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clip(V - old, +-eps), and where
    the clipped term was the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(unclipped.dtype)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token 0.5 * (logp - old_logp)^2: how far the policy moved within one rollout's updates."""
    return 0.5 * (logprobs - old_logprobs) ** 2


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by `logits` (last dim)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       reduce: Reduce = _identity) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 for a perfect critic, 0 for a constant one, negative for worse."""
    _, var_returns = masked_mean_var(returns, mask, reduce)
    _, var_residual = masked_mean_var(returns - values, mask, reduce)
    return 1 - var_residual / var_returns.clamp(min=1e-8)


def importance_weights(old_logprobs: torch.Tensor, sampled_logprobs: torch.Tensor, mask: torch.Tensor, *,
                       mode: str = "token_truncate", cap: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling for replies drawn by another engine than the trainer's (vLLM), as
    TRL's `vllm_importance_sampling_correction`: the ratio trainer / sampler of the probability of each
    sampled token, exp(old_logprobs - sampled_logprobs), multiplies the per-token policy loss, so the
    update estimates the gradient of the trainer's policy, not the sampler's. `token_truncate`: per token,
    capped at `cap`; `token_mask`: per token, 0 above `cap`; `sequence_truncate` / `sequence_mask`: one
    ratio per reply (the product over its tokens), broadcast. Returns (weights (N, R), where the cap acted),
    both without grad and 0 on padding."""
    log_ratio = torch.where(mask.bool(), (old_logprobs - sampled_logprobs).detach().float(), 0.0)
    if mode.startswith("sequence_"):
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
    ratio = torch.exp(log_ratio.clamp(max=20.0))
    if mode.endswith("_truncate"):
        weights = ratio.clamp(max=cap)
    elif mode.endswith("_mask"):
        weights = ratio.masked_fill(ratio > cap, 0.0)
    else:
        raise ValueError(f"unknown importance sampling mode {mode!r}")
    return weights * mask, ((ratio > cap) & mask.bool()).float()


# cispo (MiniMax-M1): the importance weight is clipped and detached instead of the update, aggregated per token.
GRPO_LOSS_TYPES = ("token_mean", "sequence_mean", "dr_grpo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def log_importance_weights(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log(pi / pi_old): per token (N, R), or per reply (N, 1) as GSPO's length-normalised sequence
    likelihood ratio, the mean of the reply's token log-ratios (the Qwen team's objective for MoE stability)."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level == "sequence":
        mask = mask.to(log_ratio.dtype)
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")


def grpo_per_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, epsilon: float, epsilon_high: float | None = None, beta: float = 0.0,
                        ref_logprobs: torch.Tensor | None = None, importance_sampling_level: str = "token",
                        cispo: bool = False):
    """GRPO's per-token loss (`advantages` per token (N, R), or (N, 1) per reply, broadcast), plus `beta`
    * k3 KL to the reference when beta > 0 (0 on padding, see `kl_penalty`). The objective is PPO's
    clipped ratio, the ratio per token or per reply (GSPO, `importance_sampling_level="sequence"`), or
    with `cispo` the REINFORCE term -sg(min(ratio, epsilon_high)) * A * logp, which keeps every token's
    gradient. Returns (loss, policy loss, clip flags, kl or None), each (N, R)."""
    log_weights = log_importance_weights(logprobs, old_logprobs, mask, importance_sampling_level)
    if cispo:
        ratio, high = torch.exp(log_weights), epsilon if epsilon_high is None else epsilon_high
        policy_loss = -torch.clamp(ratio, max=high).detach() * advantages * logprobs
        clipped = ((ratio > high) & (advantages > 0)).to(logprobs.dtype)
    elif importance_sampling_level == "token":
        policy_loss, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, epsilon, epsilon_high)
    else:  # one ratio per reply, clipped per reply
        policy_loss, clipped = clipped_policy_loss(log_weights, torch.zeros_like(log_weights), advantages, epsilon,
                                                   epsilon_high)
    policy_loss, clipped = policy_loss.expand_as(logprobs), clipped.expand_as(logprobs)
    if not beta:
        return policy_loss, policy_loss, clipped, None
    kl = kl_penalty(logprobs, ref_logprobs, "k3", mask)
    return policy_loss + beta * kl, policy_loss, clipped, kl


def grpo_loss_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                  max_completion_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, weight) of a micro-batch: the loss of a minibatch is sum / weight, both summed over its
    micro-batches (and ranks). `token_mean` (DAPO; TRL's bnpo on one micro-batch): every token weighs
    the same; `sequence_mean` (the original GRPO, TRL's grpo): the mean over each reply's tokens, then
    over replies; `dr_grpo` (Dr. GRPO): the token sum / (replies x max_completion_length), a constant
    normaliser that does not favour short or long replies."""
    mask = mask.to(per_token.dtype)
    rows = torch.tensor(float(per_token.shape[0]), device=per_token.device)
    if loss_type in ("token_mean", "cispo"):
        return (per_token * mask).sum(), mask.sum()
    if loss_type == "sequence_mean":
        return masked_mean(per_token, mask, dim=1).sum(), rows
    if loss_type == "dr_grpo":
        return (per_token * mask).sum(), rows * max_completion_length
    raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019) when `target` is set, moving the
    coefficient so the measured KL approaches `target` over `horizon` samples."""

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(kl_coef), target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
