"""GRPO (Shao et al. 2024, DeepSeekMath): PPO without a critic. Each prompt is answered
`num_generations` times and each reply's advantage is its reward relative to its group's.

Each training step is one iteration:

1. rollout    `num_generations` sampled replies per prompt (KV cache, no grad), each scored by
              the weighted sum of rule rewards (e.g. correctness + format) and/or a reward model;
2. compare    old and reference log-probs, where the loss reads them (no grad);
3. advantages per `advantage` (llm_stages.losses.advantages): `grpo` r - mean_group, divided by the
              std as `scale_rewards` says (TRL's `group`, `batch`, `none` as Dr. GRPO), the same for
              every token of a reply; or `rloo`, `reinforce_pp` (per-token KL in the reward, `kl_coef`),
              `reinforce_pp_baseline`;
4. update     clipped ratio objective (+ beta * k3 KL to the reference when beta > 0),
              aggregated per `loss_type`, for `ppo_epochs` passes of shuffled minibatches.

`loss_type`: `token_mean` (DAPO: every token of the minibatch weighs the same), `sequence_mean`
(the original GRPO: mean over each reply's tokens, then over replies) or `dr_grpo` (Dr. GRPO:
token sum / (replies x max_new_tokens)); each equals TRL 1.16's loss on the same tensors.
Defaults follow TRL's GRPOTrainer (beta 0, epsilon 0.2, one pass, rewards scaled by the group std).
`dynamic_sampling` (DAPO, off by default): groups whose replies all scored the same are replaced by
groups answering the next prompts (llm_stages.rollout.dynamic_sampling).
"""

from __future__ import annotations

from functools import partial

import torch

from llm_stages.data.kinds.prompt import PromptBatch
from llm_stages.errors import ConfigError
from llm_stages.losses.advantages import AdvantageInputs, advantage_settings
from llm_stages.losses.rl import (GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, grpo_loss_sum, grpo_per_token_loss,
                                  kl_penalty)
from llm_stages.rollout.dynamic_sampling import fill_informative_groups
from llm_stages.rollout.rollout import Replies, Trajectory
from llm_stages.stages.rl import RLStage, StepMeans


class GRPO(RLStage):
    def __init__(self, model, tokenizer, optim, *, num_generations: int = 8, beta: float = 0.0, epsilon: float = 0.2,
                 epsilon_high: float | None = None, scale_rewards: str | bool = "group", loss_type: str = "token_mean",
                 advantage: str = "grpo", kl_coef: float = 0.0, gamma: float = 1.0, dynamic_sampling: bool = False,
                 max_extra_rounds: int = 4, importance_sampling_level: str = "token", **kwargs):
        if loss_type not in GRPO_LOSS_TYPES:
            raise ConfigError(f"module.loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ConfigError(f"module.importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS} "
                              f"(sequence: GSPO), got {importance_sampling_level!r}")
        if loss_type == "cispo" and (epsilon_high is None or epsilon_high <= 0):
            raise ConfigError("module.loss_type=cispo clips the importance weight at module.epsilon_high (its "
                              f"epsilon_max, e.g. 4.0), got {epsilon_high}: set module.epsilon_high=<number > 0>")
        settings = advantage_settings(dict(advantage=advantage, scale_rewards=scale_rewards, kl_coef=kl_coef, gamma=gamma),
                                      beta)
        if num_generations < 2:
            raise ConfigError("module.num_generations must be >= 2: advantages compare replies within a group")
        # Without a KL term (in the loss or in the reward) no reference model is needed, nor held in memory.
        super().__init__(model, tokenizer, optim, reference=beta > 0 or kl_coef > 0, **kwargs)
        self.advantage, self.needs_reference = settings, beta > 0 or kl_coef > 0
        self.num_generations, self.beta, self.epsilon, self.epsilon_high = num_generations, beta, epsilon, epsilon_high
        self.loss_type, self.dynamic_sampling, self.max_extra_rounds = loss_type, dynamic_sampling, max_extra_rounds
        self.importance_sampling_level = importance_sampling_level

    def training_step(self, batch: list[PromptBatch], batch_idx: int) -> torch.Tensor:
        group = self.num_generations
        # 1. Rollout: `group` replies per prompt, consecutive, each scored.
        replies = self.sample_and_score(batch[0], repeats=group)
        if self.dynamic_sampling:
            replies = self.replace_uninformative_groups(replies)
        sample, scores, mask = replies.sample, replies.scores.total, replies.sample.response_mask

        # 2. Old and reference log-probs, only where the loss needs them. With one pass over one
        # minibatch (`single_pass`) the policy that sampled is the one being updated: its log-probs
        # are the detached current ones (taken in grpo_loss), and a forward pass is saved.
        single_pass = self.ppo_epochs <= 1 and self.mini_batch_size >= mask.shape[0]
        zeros = torch.zeros(mask.shape, device=mask.device)  # what the loss does not read
        with torch.no_grad():
            old_logprobs = zeros if single_pass else self.response_logprobs(self.model, sample)[0] * mask
            ref_logprobs = self.reference_logprobs(sample) * mask if self.needs_reference else zeros
        if not single_pass:
            self.track_logprob_diff(sample.sampled_logprobs, old_logprobs, mask)  # else in grpo_loss, from the update's own forward

        # 3. Advantages, per token. The KL in reinforce_pp's reward is that of the policy that sampled.
        kl = kl_penalty(sample.sampled_logprobs if single_pass else old_logprobs, ref_logprobs, "k1", mask) \
            if self.advantage.kl_coef else None
        advantages = self.advantage.compute(AdvantageInputs(scores, mask, group, kl), reduce=self._all_reduce)
        if self.distill_coef:  # on-policy distillation: a dense per-token term, not spread over the reply
            reverse_kl = self.teacher_reverse_kl(sample, None if single_pass else old_logprobs)
            advantages = advantages - self.distill_coef * reverse_kl
        trajectory = Trajectory.from_sample(sample, logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                            advantages=advantages, scores=scores)

        # 4. Update: minibatch epochs, one optimiser step each, weighted as `loss_type` says.
        steps = StepMeans()
        loss = partial(self.grpo_loss, single_pass=single_pass)
        for micro_batches in self.minibatches(trajectory):
            steps.add(*self.accumulated_step(micro_batches, loss, self.loss_weight_of))
        stats = steps.means()
        if kl is not None:
            stats["kl_in_reward"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        stats["frac_reward_zero_std"] = (scores.view(-1, group).std(1) < 1e-6).float().mean()
        if self.distill_coef:
            stats["distill_reverse_kl"] = reverse_kl.sum() / mask.sum().clamp(min=1)
        self.log_rollout("grpo", stats, replies, batch_idx)
        self._mark_batch_consumed()
        return stats["loss"]

    def replace_uninformative_groups(self, replies: Replies) -> Replies:
        """DAPO's dynamic sampling: `replies` with its all-equal groups replaced by informative groups
        answering the next prompts; logs rollout/kept_groups, rollout/dropped_groups, rollout/extra_rounds."""
        def next_rollout(round_: int) -> Replies | None:
            prompts = self.next_prompt_batch()
            return None if prompts is None else self.rollout(
                self.model, prompts, repeats=self.num_generations, seed=self.rollout_seed(self.global_step, round_),
                version=self.global_step)

        filled = fill_informative_groups(replies, next_rollout, group_size=self.num_generations,
                                         max_extra_rounds=self.max_extra_rounds, pad_token_id=self.tokenizer.pad_token_id,
                                         shortfall_anywhere=lambda n: int(self._all_reduce(torch.tensor(n, device=self.device))))
        self.generation_seconds = filled.replies.generation_seconds
        self.log_dict({f"rollout/{k}": float(getattr(filled, k)) for k in ("kept_groups", "dropped_groups", "extra_rounds")},
                      sync_dist=True)
        return filled.replies

    def loss_weight_of(self, mb: Trajectory) -> torch.Tensor:
        return self._loss_sum(mb.response_mask, mb.response_mask)[1]

    def _loss_sum(self, per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grpo_loss_sum(per_token.float(), mask, self.loss_type, self.generation["max_new_tokens"])

    def grpo_loss(self, mb: Trajectory, *, single_pass: bool):
        """Summed loss of a micro-batch. `single_pass`: the policy being updated is the one that sampled
        (one epoch, one minibatch), so the old log-probs are its own, detached; else those of `mb`."""
        mask = mb.response_mask
        logprobs = self.response_logprobs(self.model, mb)[0]
        if single_pass:
            self.track_logprob_diff(mb.sampled_logprobs, logprobs, mask)
        old = logprobs.detach() if single_pass else mb.logprobs
        per_token, policy_loss, clipped, kl = grpo_per_token_loss(
            logprobs, old, mb.advantages, mask, epsilon=self.epsilon, epsilon_high=self.epsilon_high, beta=self.beta,
            ref_logprobs=mb.ref_logprobs, importance_sampling_level=self.importance_sampling_level,
            cispo=self.loss_type == "cispo")
        weights = self.sampler_importance_weights(old, mb.sampled_logprobs, mask)  # vLLM sampled: TRL's truncated IS
        if weights is not None:
            per_token, policy_loss = per_token * weights, policy_loss * weights
        # Stats in the loss's units (the update divides them by the same weight).
        stats = {"policy_loss": self._loss_sum(policy_loss.detach(), mask)[0], "clipfrac": self._loss_sum(clipped, mask)[0]}
        if kl is not None:
            stats["kl"] = self._loss_sum(kl.detach(), mask)[0]
        return self._loss_sum(per_token, mask)[0], stats
