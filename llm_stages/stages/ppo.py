"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022), as in the seeds' RLHF step.

Four models: the actor (the policy, from an SFT export), the critic (a value head on an RM
export, or on a copy of the actor), the frozen reference (the initial actor) and the reward
(an RM export and/or rule functions). Each training step is one iteration:

1. rollout    sample replies to a batch of prompts with the actor (KV cache, no grad) and
              score each (llm_stages.rollout.rollout);
2. compare    log-probs of actor and reference, values of the critic (no grad);
3. advantages per-token reward = -kl_coef * KL(actor || reference), plus the clipped score on
              the last reply token; GAE over the reply; whitened advantages;
4. update     `ppo_epochs` passes of shuffled minibatches: clipped policy loss + vf_coef *
              clipped value loss (- ent_coef * entropy), one optimiser step per minibatch.

Defaults follow TRL's last PPOTrainer (kl_coef 0.05, cliprange 0.2, cliprange_value 0.2,
vf_coef 0.1, gamma 1, lam 0.95, 4 epochs).
"""

from __future__ import annotations

import copy

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

from llm_stages.adapters import is_adapted, load_trainable_model
from llm_stages.data.kinds.prompt import PromptBatch
from llm_stages.errors import ConfigError
from llm_stages.losses.rl import (KLController, approx_kl, clipped_policy_loss, clipped_value_loss, explained_variance, gae,
                                  kl_penalty, masked_mean, shaped_rewards, whiten)
from llm_stages.models import load_tokenizer
from llm_stages.rollout.rollout import Trajectory, position_ids
from llm_stages.rollout.sampling import Sample, disable_dropout
from llm_stages.stages.rl import RLStage, StepMeans


def critic_from_actor(actor) -> torch.nn.Module:
    """A value model sharing the actor's initial backbone weights, with a fresh scalar head."""
    config = copy.deepcopy(actor.config)
    config.num_labels = 1
    critic = AutoModelForSequenceClassification.from_config(config).to(next(actor.parameters()).dtype)
    missing, _ = critic.load_state_dict(actor.state_dict(), strict=False)
    if any(not name.startswith("score.") for name in missing):
        raise ConfigError(f"cannot build a critic from the actor: backbone weights missing {missing[:3]}; set module.critic_path")
    return critic


def load_critic(model_cfg, tokenizer, peft_cfg=None) -> torch.nn.Module:
    """A value model loaded as `model_cfg` says (an RM export, or the actor's own base), with a
    LoRA adapter of its own when `peft_cfg` is set."""
    if model_cfg.get("path") and load_tokenizer(model_cfg).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the critic at {model_cfg.path} uses a different vocabulary than the actor")
    return load_trainable_model(model_cfg, tokenizer, head="reward", peft_cfg=peft_cfg)


class PPO(RLStage):
    def __init__(self, model, tokenizer, optim, *, critic_path: str | None = None, kl_coef: float = 0.05,
                 kl_estimator: str = "k1", kl_target: float | None = None, kl_horizon: int = 10000,
                 reward_clip: float | None = 10.0, cliprange: float = 0.2, cliprange_value: float = 0.2,
                 vf_coef: float = 0.1, ent_coef: float = 0.0, gamma: float = 1.0, lam: float = 0.95,
                 whiten_advantages: bool = True, export_critic: bool = False, ppo_epochs: int = 4,
                 critic_model=None, peft=None, **kwargs):
        super().__init__(model, tokenizer, optim, ppo_epochs=ppo_epochs, reference=True, **kwargs)
        if critic_path or peft:
            critic_cfg = OmegaConf.merge(critic_model or {}, {"name": "critic", "path": critic_path} if critic_path else {})
            self.critic = load_critic(critic_cfg, tokenizer, peft)
        else:
            self.critic = critic_from_actor(model)
        disable_dropout(self.critic)  # its values at rollout and in the update come from the same function
        self.kl_ctl = KLController(kl_coef, kl_target, kl_horizon)
        self.kl_estimator, self.reward_clip = kl_estimator, reward_clip
        self.cliprange, self.cliprange_value, self.vf_coef, self.ent_coef = cliprange, cliprange_value, vf_coef, ent_coef
        self.gamma, self.lam, self.whiten_advantages = gamma, lam, whiten_advantages
        self.export_critic = export_critic
        kl_penalty(torch.zeros(1), torch.zeros(1), kl_estimator)  # fail now on an unknown estimator

    def trainable(self) -> torch.nn.Module:
        return torch.nn.ModuleList([self.model, self.critic])

    def exports(self) -> dict[str, torch.nn.Module]:
        return {"export": self.model, **({"critic_export": self.critic} if self.export_critic else {})}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.critic.train()

    def values(self, trajectory: Sample | Trajectory) -> torch.Tensor:
        """V(s_t) for every reply token t: the critic's head on the hidden state that predicts it."""
        mask = trajectory.attention_mask
        critic = self.critic.get_base_model() if is_adapted(self.critic) else self.critic  # LoRA layers sit inside
        hidden = critic.base_model(input_ids=trajectory.input_ids, attention_mask=mask,
                                   position_ids=position_ids(mask), use_cache=False).last_hidden_state
        width = trajectory.response.shape[1]
        return critic.score(hidden[:, -width - 1:-1]).squeeze(-1).float()

    def training_step(self, batch: list[PromptBatch], batch_idx: int) -> torch.Tensor:
        # 1. Rollout: replies sampled with the current actor, each scored (rule rewards and/or the RM).
        replies = self.sample_and_score(batch[0])
        sample, scores, mask = replies.sample, replies.scores.total, replies.sample.response_mask

        # 2. What the update compares against (all without grad): actor, reference, critic.
        with torch.no_grad():
            logprobs = self.response_logprobs(self.model, sample)[0] * mask
            ref_logprobs = self.reference_logprobs(sample) * mask
            values = self.values(sample) * mask
        self.track_logprob_diff(sample.sampled_logprobs, logprobs, mask)

        # 3. Advantages: KL-penalised per-token rewards, the clipped score on the last reply token; GAE.
        kl = kl_penalty(logprobs, ref_logprobs, self.kl_estimator) * mask
        clipped = scores.clamp(-self.reward_clip, self.reward_clip) if self.reward_clip else scores
        rewards = shaped_rewards(clipped, kl, mask, self.kl_ctl.value)
        if self.distill_coef:  # on-policy distillation: each token's reverse KL to the teacher, a dense reward
            reverse_kl = self.teacher_reverse_kl(sample, logprobs)
            rewards = rewards - self.distill_coef * reverse_kl
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask, reduce=self._all_reduce)
        trajectory = Trajectory.from_sample(sample, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards,
                                            advantages=advantages, returns=returns, scores=scores)

        # 4. Update: minibatch epochs, one optimiser step on the token mean of each minibatch.
        steps = StepMeans()
        for micro_batches in self.minibatches(trajectory):
            steps.add(*self.accumulated_step(micro_batches, self.ppo_loss, lambda mb: mb.response_mask.sum()))
        stats = steps.means()

        sequence_kl = kl.sum(1).mean()
        self.kl_ctl.update(float(self._all_reduce(sequence_kl) / self.trainer.world_size),
                           n_samples=mask.shape[0] * self.trainer.world_size)
        stats.update(kl=sequence_kl, kl_coef=torch.tensor(self.kl_ctl.value),
                     explained_variance=explained_variance(values, returns, mask.float(), reduce=self._all_reduce),
                     score_mean=scores.mean(), advantage_mean=masked_mean(advantages, mask))
        if self.distill_coef:
            stats["distill_reverse_kl"] = masked_mean(reverse_kl, mask)
        self.log_rollout("ppo", stats, replies, batch_idx)
        self._mark_batch_consumed()
        return stats["loss"]

    def ppo_loss(self, mb: Trajectory):
        """Summed per-token loss of a micro-batch (the update divides by the minibatch's token count)."""
        mask = mb.response_mask.float()
        logprobs, entropy = self.response_logprobs(self.model, mb, with_entropy=True)
        if not self.ent_coef:
            entropy = entropy.detach()
        values = self.values(mb)
        policy_loss, policy_clipped = clipped_policy_loss(logprobs, mb.logprobs, mb.advantages, self.cliprange)
        weights = self.sampler_importance_weights(mb.logprobs, mb.sampled_logprobs, mb.response_mask)  # vLLM sampled
        if weights is not None:
            policy_loss = policy_loss * weights
        value_loss, value_clipped = clipped_value_loss(values, mb.values, mb.returns, self.cliprange_value)
        per_token = policy_loss + self.vf_coef * value_loss - self.ent_coef * entropy
        token_sum = lambda x: (x.detach() * mask).sum()  # noqa: E731
        stats = {"policy_loss": token_sum(policy_loss), "value_loss": token_sum(value_loss),
                 "clipfrac": token_sum(policy_clipped), "value_clipfrac": token_sum(value_clipped),
                 "approx_kl": token_sum(approx_kl(logprobs, mb.logprobs)), "entropy": token_sum(entropy)}
        return (per_token * mask).sum(), stats

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
