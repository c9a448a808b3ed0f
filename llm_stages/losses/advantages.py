"""Critic-free advantage estimators of the RL stages, chosen by `module.advantage=<name>`.

Each is a pure function of one rollout's rewards (`AdvantageInputs`: the sequence scores with the
`group_size` replies of a prompt consecutive, the reply mask and, where a reference model is held,
the per-token KL to it) and its own keyword parameters, returning per-token advantages (N, R), 0 on
padding. `reduce` sums over data-parallel ranks, so batch statistics see the whole global batch.

| name | advantage of reply i (group of n, scores r) | reference |
|---|---|---|
| grpo | (r_i - mean_group r) / (std + 1e-4) per `scale_rewards` | TRL GRPOTrainer; verl compute_grpo_outcome_advantage |
| rloo | r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_group r) | OpenRLHF process_experiences `rloo`; verl compute_rloo_outcome_advantage |
| reinforce_pp | whiten_batch(return-to-go of r_i at the last token - kl_coef * KL_t) | OpenRLHF `reinforce`; verl compute_reinforce_plus_plus_outcome_advantage |
| reinforce_pp_baseline | reinforce_pp of r_i - mean_group r | OpenRLHF `reinforce_baseline`; verl compute_reinforce_plus_plus_baseline_outcome_advantage |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from llm_stages.errors import ConfigError
from llm_stages.losses.rl import Reduce, _identity, masked_mean_var, shaped_rewards, whiten


class AdvantageInputs(NamedTuple):
    scores: torch.Tensor  # (N,) sequence rewards, the replies of a prompt consecutive
    mask: torch.Tensor  # (N, R) 1 on reply tokens
    group_size: int  # replies per prompt
    kl: torch.Tensor | None = None  # (N, R) per-token KL (k1) to the reference, 0 on padding; None without one


SCALE_REWARDS = ("none", "group", "batch")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     reduce: Reduce = _identity) -> torch.Tensor:
    """GRPO: each completion's reward relative to the other completions of its prompt, r - mean_group,
    divided by (std + eps) as TRL's `scale_rewards` says: `group` the std of its group (the
    original GRPO), `batch` the std of all rewards on all ranks (`reduce`), `none` not divided
    (Dr. GRPO). Stds are unbiased, as in TRL. `rewards` holds the groups consecutively: (prompts * group_size,)."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    elif scale == "batch":
        _, variance = masked_mean_var(rewards, torch.ones_like(rewards), reduce)
        centred = centred / (variance.sqrt() + eps)
    return centred.reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go G_t = r_t + gamma * G_{t+1} over each reply's tokens, 0 on padding (OpenRLHF
    `get_cumulative_returns`; verl's loop in compute_reinforce_plus_plus_outcome_advantage)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def grpo(inputs: AdvantageInputs, *, scale_rewards: str = "group", reduce: Reduce = _identity) -> torch.Tensor:
    """Group-relative, the same on every token of a reply (see group_advantages)."""
    return group_advantages(inputs.scores, inputs.group_size, scale=scale_rewards, reduce=reduce)[:, None] * inputs.mask


def rloo(inputs: AdvantageInputs, *, reduce: Reduce = _identity) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024): the baseline of a reply is the mean reward of
    the other n - 1 replies to its prompt, so it does not depend on the reply itself (unbiased);
    as OpenRLHF experience_maker.py `process_experiences` (advantage_estimator rloo) and verl
    core_algos.py `compute_rloo_outcome_advantage`. Not scaled."""
    n = inputs.group_size
    grouped = inputs.scores.view(-1, n)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (n - 1)
    return (grouped - baseline).reshape(-1)[:, None] * inputs.mask


def reinforce_pp(inputs: AdvantageInputs, *, kl_coef: float = 0.0, gamma: float = 1.0,
                 reduce: Reduce = _identity) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): token rewards -kl_coef * KL_t with the score added at
    the last reply token (OpenRLHF models/utils.py `compute_reward`, our `shaped_rewards`), their
    discounted return-to-go (experience_maker.py `get_cumulative_returns`), whitened over every
    valid token of the global batch (verl core_algos.py `compute_reinforce_plus_plus_outcome_advantage`
    with verl_F.masked_whiten: unbiased variance, rsqrt(var + 1e-8))."""
    kl = inputs.kl if inputs.kl is not None else torch.zeros_like(inputs.mask, dtype=inputs.scores.dtype)
    rewards = shaped_rewards(inputs.scores, kl, inputs.mask, kl_coef)
    return whiten(discounted_returns(rewards, inputs.mask, gamma), inputs.mask, reduce=reduce)


def reinforce_pp_baseline(inputs: AdvantageInputs, *, kl_coef: float = 0.0, gamma: float = 1.0,
                          reduce: Reduce = _identity) -> torch.Tensor:
    """REINFORCE++-baseline: the group mean reward subtracted first (no / std), then reinforce_pp
    (OpenRLHF `reinforce_baseline`; with kl_coef 0 and gamma 1 equal to verl core_algos.py
    `compute_reinforce_plus_plus_baseline_outcome_advantage`, which tiles the centred score)."""
    grouped = inputs.scores.view(-1, inputs.group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    return reinforce_pp(inputs._replace(scores=centred), kl_coef=kl_coef, gamma=gamma, reduce=reduce)


ADVANTAGES = {"grpo": grpo, "rloo": rloo, "reinforce_pp": reinforce_pp, "reinforce_pp_baseline": reinforce_pp_baseline}
KL_IN_REWARD = ("reinforce_pp", "reinforce_pp_baseline")  # the estimators that take kl_coef and gamma


@dataclass(frozen=True)
class AdvantageSettings:
    """`module.advantage` and the parameters it takes, checked when made (one ConfigError line).

    KL to the reference enters one of two ways, never both: `beta` (the stage's loss term, k3, for
    grpo and rloo as in TRL) or `kl_coef` (k1 folded into the token rewards of reinforce_pp and
    reinforce_pp_baseline, as OpenRLHF without --use_kl_loss). Either > 0 makes the stage hold a
    frozen reference."""

    name: str = "grpo"
    scale_rewards: str = "group"  # grpo: divide by the std of the group | batch | none
    kl_coef: float = 0.0  # reinforce_pp(_baseline): -kl_coef * KL_t in each token's reward
    gamma: float = 1.0  # reinforce_pp(_baseline): discount of the return-to-go

    def __post_init__(self):
        if self.name not in ADVANTAGES:
            raise ConfigError(f"module.advantage={self.name}: expected one of {', '.join(ADVANTAGES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"module.scale_rewards={self.scale_rewards}: expected one of {', '.join(SCALE_REWARDS)}")
        if not (isinstance(self.kl_coef, (int, float)) and self.kl_coef >= 0):
            raise ConfigError(f"module.kl_coef={self.kl_coef}: expected a number >= 0")
        if self.kl_coef and self.name not in KL_IN_REWARD:
            raise ConfigError(f"module.kl_coef={self.kl_coef} puts the KL into the reward of {' and '.join(KL_IN_REWARD)} "
                              f"only; with module.advantage={self.name} use module.beta (the KL loss term)")
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            raise ConfigError(f"module.gamma={self.gamma}: expected a number in (0, 1]")

    def compute(self, inputs: AdvantageInputs, reduce: Reduce = _identity) -> torch.Tensor:
        if self.name == "grpo":
            return grpo(inputs, scale_rewards=self.scale_rewards, reduce=reduce)
        if self.name in KL_IN_REWARD:
            return ADVANTAGES[self.name](inputs, kl_coef=self.kl_coef, gamma=self.gamma, reduce=reduce)
        return ADVANTAGES[self.name](inputs, reduce=reduce)


def advantage_settings(module, beta: float = 0.0) -> AdvantageSettings:
    """The settings from a stage's `module` config (or keyword dict); refuses beta and kl_coef together."""
    scale = module.get("scale_rewards", "group")
    scale = {True: "group", False: "none"}.get(scale, scale)  # TRL's older booleans
    settings = AdvantageSettings(module.get("advantage", "grpo"), scale, module.get("kl_coef", 0.0), module.get("gamma", 1.0))
    if beta and settings.kl_coef:
        raise ConfigError(f"module.beta={beta} and module.kl_coef={settings.kl_coef} would both penalise the KL to the "
                          "reference: set module.beta=0 (reinforce_pp keeps the KL in the reward)")
    return settings
