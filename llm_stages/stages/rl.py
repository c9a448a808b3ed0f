"""What the RL stages (PPO, GRPO) share around their algorithm: the rollout (llm_stages.rollout.rollout,
built by Hydra from the config's `rollout:` node), per-token log-probs, the minibatch epochs, logging, and
validation by reward.

One training step of an RL stage is one iteration: a batch of prompts from the data module is
answered and scored (`self.rollout`), turned into a `Trajectory`, then the policy takes
`ppo_epochs * len(trajectory) / mini_batch_size` optimiser steps on it (`minibatches`). Lightning's
`global_step` (and so `trainer.max_steps`) counts those optimiser steps; `val_check_interval`
counts iterations. A trajectory never outlives its iteration, so a checkpoint (always written
between iterations) holds no half-used one.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from llm_stages.adapters import frozen_reference, reference_of
from llm_stages.data.kinds.prompt import PromptBatch
from llm_stages.errors import ConfigError
from llm_stages.losses.chunked import head_outputs
from llm_stages.losses.rl import entropy_from_logits, importance_weights
from llm_stages.rollout.episodes import episode_metrics
from llm_stages.rollout.rewards import check_reward_inputs
from llm_stages.rollout.rollout import Replies, Rollout, RolloutBuffer, Trajectory, position_ids
from llm_stages.rollout.sampling import disable_dropout
from llm_stages.rollout.shared_prompt import SharedPromptRows, prompt_groups, share_prompts, token_saving
from llm_stages.stages.base import Stage
from llm_stages.stages.pair_scoring import scores_at, shared_prompt_unsupported
from llm_stages.stages.teacher import load_teacher
from llm_stages.training.tables import record_table


class RLStage(Stage):
    fsdp1_unsupported = "the RL stages generate and call model parts outside the sharded model's forward"

    def __init__(self, model, tokenizer, optim, *, rollout: Callable[..., Rollout], ppo_epochs: int = 1,
                 mini_batch_size: int = 8, micro_batch_size: int | None = None, log_samples_every: int = 10,
                 seed: int = 0, reference: bool = True, teacher=None, distill_coef: float = 0.0,
                 share_prompt: str | bool = "auto", share_prompt_min_saving: float = 0.2):
        """`rollout`: rollout.Rollout with its settings (Hydra's partial of the config's `rollout:`
        node), completed here with the policy and tokenizer; then the update's settings. `distill_coef` > 0
        adds on-policy distillation: each reply token's reward is lowered by distill_coef times the
        policy's reverse KL to the frozen `teacher` (any model config) at that token. `share_prompt`
        (auto | true | false): score the replies to one prompt with the prompt forwarded once
        (llm_stages.rollout.shared_prompt); auto: when that saves at least `share_prompt_min_saving` of the tokens."""
        super().__init__(model, tokenizer, optim)
        self.share_prompt = str(share_prompt).lower()
        if self.share_prompt not in ("auto", "true", "false"):
            raise ConfigError(f"module.share_prompt={share_prompt}: expected one of auto, true, false")
        self.share_prompt_min_saving = share_prompt_min_saving
        self.rollout = rollout(model, tokenizer)
        disable_dropout(model)
        self.ppo_epochs, self.mini_batch_size = ppo_epochs, mini_batch_size
        self.micro_batch_size = micro_batch_size or mini_batch_size
        if mini_batch_size % self.micro_batch_size:
            raise ConfigError(f"module.mini_batch_size={mini_batch_size} must be a multiple of "
                              f"module.micro_batch_size={self.micro_batch_size}")
        self.log_samples_every, self.seed = log_samples_every, seed
        if distill_coef > 0 and not (teacher or {}).get("path"):
            raise ConfigError(f"module.distill_coef={distill_coef}: a distillation reward needs "
                              "module.teacher.path=<the teacher's checkpoint>")
        self.distill_coef = distill_coef
        self.teacher, self.teacher_vocab = load_teacher(teacher, tokenizer) if distill_coef else (None, None)
        # The frozen reference is the initial policy.
        # (Under LoRA, the policy with its adapter switched off: see reference_logprobs.)
        self.reference = frozen_reference(model) if reference else None
        self.generation_seconds = self.update_seconds = float("nan")
        self._sample_rows: list[list] = []
        self._logprob_diffs: list[torch.Tensor] = []
        self._importance: list[tuple[torch.Tensor, torch.Tensor]] = []
        # (mode, cap) of the truncated importance sampling when another engine samples (rollout.backend=vllm)
        self.importance_sampling = getattr(self.rollout.sampler, "importance_sampling", None)

    def setup(self, stage: str) -> None:
        # After the DataModule's setup, before any rollout: a rule reward whose input the data lacks
        # (no reference answers) would score 0 for every reply.
        datamodule = self.trainer.datamodule
        if datamodule is not None and not getattr(self, "_reward_inputs_checked", False):
            rewards = {name: fn for name, (fn, _weight) in self.rollout.scorer.rewards.items()}
            check_reward_inputs(rewards, datamodule.data, [getattr(datamodule, "val_path", None)])
            self._reward_inputs_checked = True

    @property
    def generation(self) -> dict:
        return self.rollout.sampler.generation

    @property
    def reward_model(self) -> torch.nn.Module | None:
        return self.rollout.scorer.reward_model

    def rollout_seed(self, *parts: int) -> int:
        """Seeds sampling and minibatch order by (seed, rank, parts): a resumed run draws the same."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return hash((self.seed, rank, *parts)) % (2 ** 31)

    def sample_and_score(self, prompts: PromptBatch, *, repeats: int = 1) -> Replies:
        replies = self.rollout(self.model, prompts, repeats=repeats, seed=self.rollout_seed(self.global_step),
                               version=self.global_step)
        self.generation_seconds = replies.generation_seconds
        return replies

    def next_prompt_batch(self) -> PromptBatch | None:
        """The training loader's next batch of prompts, drawn inside a training step (DAPO's dynamic
        sampling), or None at the end of the epoch. It comes from the iterator Lightning's loop reads
        (its fetcher, a private attribute), so Lightning does not serve it again, and it is counted as
        consumed, so a resumed run starts after it."""
        try:
            batch, _, _ = next(self.trainer.fit_loop._data_fetcher)
        except StopIteration:
            return None
        self._mark_batch_consumed()
        return self.trainer.strategy.batch_to_device(batch)[0]

    # -- log-probs -------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logprobs(self, trajectory) -> torch.Tensor:
        with reference_of(self.model, self.reference) as reference:
            return self.response_logprobs(reference, trajectory)[0]

    @torch.no_grad()
    def teacher_reverse_kl(self, sample, policy_logprobs: torch.Tensor | None = None) -> torch.Tensor:
        """log pi(y_t) - log pi_teacher(y_t) of each sampled reply token (N, R), 0 on padding: the
        one-sample estimate of the reverse KL to the teacher that on-policy distillation minimises.
        `policy_logprobs`: the policy's, when the stage already holds them (over the whole vocabulary,
        so used only where the teacher shares all of it)."""
        reuse = policy_logprobs is not None and self.teacher_vocab is None
        student = policy_logprobs if reuse else self.response_logprobs(self.model, sample, vocab_size=self.teacher_vocab)[0]
        teacher = self.response_logprobs(self.teacher, sample, vocab_size=self.teacher_vocab)[0]
        return (student - teacher) * sample.response_mask

    def response_logprobs(self, model, trajectory, *, with_entropy: bool = False, vocab_size: int | None = None):
        """Per-token log-probs of the sampled replies (a Sample or Trajectory) under `model` (at the
        sampling temperature; over the first `vocab_size` ids when set), and optionally the per-token
        entropy; (N, R) each."""
        response, mask = trajectory.response, trajectory.attention_mask
        # Only the positions that predict reply tokens go through the LM head.
        temperature = self.generation.get("temperature") or 1.0
        if vocab_size is not None:  # over the ids a teacher shares with the policy: the full logits, cut
            logits = model(input_ids=trajectory.input_ids, attention_mask=mask, position_ids=position_ids(mask),
                           use_cache=False, logits_to_keep=response.shape[1] + 1).logits[:, :-1, :vocab_size].float()
            logprobs = torch.log_softmax(logits / temperature, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
            return logprobs, entropy_from_logits(logits / temperature) if with_entropy else None
        shared = self.shared_prompt_rows(model, trajectory)
        if shared is not None:
            return self._shared_prompt_logprobs(model, shared, response.shape, temperature, with_entropy)
        outputs = head_outputs(model, response.shape[1] + 1, input_ids=trajectory.input_ids, attention_mask=mask,
                               position_ids=position_ids(mask))
        scores = outputs[:, :-1].scores(response, temperature=temperature, with_entropy=with_entropy)
        logprobs, entropy = scores.logps, scores.entropy
        return logprobs, entropy

    def shared_prompt_rows(self, model, trajectory) -> SharedPromptRows | None:
        """The replies of `trajectory` laid out with each prompt forwarded once (llm_stages.rollout.shared_prompt),
        when rows share prompts, `module.share_prompt` allows it, and the model takes a 4-D mask; else None."""
        if self.share_prompt == "false":
            return None
        groups = prompt_groups(trajectory.query, trajectory.query_mask)
        if len(groups) == trajectory.query.shape[0]:
            return None  # no prompt answered twice here (PPO; or a micro-batch of one reply per prompt)
        seen = trajectory.response_mask | trajectory.observation_mask
        if self.share_prompt == "auto" and token_saving(trajectory.query_mask, seen, groups) < self.share_prompt_min_saving:
            return None
        why = shared_prompt_unsupported(model, reward_head=False, sharded=False)
        if why:
            if self.share_prompt == "true":
                raise ConfigError(f"module.share_prompt=true cannot be used here: {why}; set module.share_prompt=auto")
            return None
        return share_prompts(trajectory.query, trajectory.query_mask, trajectory.response, seen, groups)

    @staticmethod
    def _shared_prompt_logprobs(model, rows: SharedPromptRows, shape, temperature: float, with_entropy: bool):
        scores = scores_at(model, rows.input_ids, rows.attention_mask, rows.position_ids, rows.source_row,
                           rows.source_column, rows.tokens, temperature=temperature, with_entropy=with_entropy)
        n = shape[0] * shape[1]
        logprobs = scores.logps.new_zeros(n).index_put((rows.index,), scores.logps).view(shape)
        entropy = scores.entropy.new_zeros(n).index_put((rows.index,), scores.entropy).view(shape) if with_entropy else None
        return logprobs, entropy

    def track_logprob_diff(self, sampled: torch.Tensor, trained: torch.Tensor, mask: torch.Tensor) -> None:
        """Notes |sampling-time - training-time log-prob| of reply tokens, logged per iteration as
        rollout/logprob_diff_max and _mean: near 1e-6 when sampling draws from the distribution the loss assumes."""
        self._logprob_diffs.append((sampled - trained.detach()).abs()[mask.bool()].float())

    def sampler_importance_weights(self, old: torch.Tensor, sampled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The per-token weights of the policy loss correcting for a sampler that is not the trainer
        (losses.rl.importance_weights; rollout.vllm.importance_sampling), or None (the policy sampled itself).
        Logged per iteration as rollout/is_ratio_{mean,min,max} and rollout/is_capped_frac."""
        if self.importance_sampling is None:
            return None
        mode, cap = self.importance_sampling
        weights, capped = importance_weights(old, sampled, mask, mode=mode, cap=cap)
        self._importance.append((weights[mask.bool()], capped[mask.bool()]))
        return weights

    def release(self) -> None:
        """Stops the vLLM server (if any) once training and the last validation are done."""
        self.rollout.close()

    # -- minibatch epochs ------------------------------------------------------------------------
    def minibatches(self, trajectory: Trajectory) -> Iterator[list[Trajectory]]:
        """`ppo_epochs` passes over the trajectory in shuffled minibatches (one optimiser step each),
        each split into micro-batches for memory. Times the whole as update_seconds."""
        buffer = RolloutBuffer(trajectory)
        if len(buffer) % self.mini_batch_size:
            raise ConfigError(f"module.mini_batch_size={self.mini_batch_size} must divide the {len(buffer)} "
                              "replies of one rollout per device")
        seed, started = self.rollout_seed(self.global_step), time.perf_counter()
        for epoch in range(self.ppo_epochs):
            for minibatch in buffer.minibatches(self.mini_batch_size, seed=seed, epoch=epoch):
                yield [minibatch.rows(slice(i, i + self.micro_batch_size))
                       for i in range(0, self.mini_batch_size, self.micro_batch_size)]
        self.update_seconds = time.perf_counter() - started

    # -- logging ---------------------------------------------------------------------------------
    def log_rollout(self, prefix: str, stats: dict[str, torch.Tensor], replies: Replies, batch_idx: int) -> None:
        """Per-iteration statistics, averaged over ranks; every `log_samples_every` iterations, a few
        rollouts into `<run dir>/rollouts.jsonl` and the W&B table `rollouts`."""
        scores, components = replies.scores.total, replies.scores.components
        response_mask = replies.sample.response_mask
        logged = {f"{prefix}/{k}": v for k, v in stats.items()}
        logged.update({"env/reward_mean": scores.mean(), "env/reward_std": scores.std() if scores.numel() > 1 else scores.new_zeros(()),
                       "env/response_length": response_mask.sum(1).float().mean()})
        logged.update({f"env/reward/{k}": v.mean() for k, v in components.items()})
        if replies.episodes is not None:
            logged.update({f"env/{k}": torch.tensor(v) for k, v in episode_metrics(replies.episodes).items()})
        logged.update({"perf/rollout_tokens_per_s": response_mask.sum() / self.generation_seconds,
                       "perf/generation_seconds": torch.tensor(self.generation_seconds),
                       "perf/update_seconds": torch.tensor(self.update_seconds)})
        self.log_dict({k: v.float() for k, v in logged.items()}, sync_dist=True)
        if self._logprob_diffs:
            diffs, self._logprob_diffs = torch.cat(self._logprob_diffs), []
            count, total = self._all_reduce(diffs.new_tensor(float(diffs.numel()))), self._all_reduce(diffs.sum())
            self.log("rollout/logprob_diff_mean", total / count.clamp(min=1), sync_dist=True)
            self.log("rollout/logprob_diff_max", diffs.max() if diffs.numel() else diffs.new_zeros(()),
                     sync_dist=True, reduce_fx="max")
        if self._importance:
            weights, capped = (torch.cat(parts) for parts in zip(*self._importance))
            self._importance = []
            if weights.numel():
                self.log_dict({"rollout/is_ratio_mean": weights.mean(), "rollout/is_capped_frac": capped.mean()}, sync_dist=True)
                self.log("rollout/is_ratio_min", weights.min(), sync_dist=True, reduce_fx="min")
                self.log("rollout/is_ratio_max", weights.max(), sync_dist=True, reduce_fx="max")
        if hasattr(self.rollout.sampler, "sync_seconds"):
            self.log("perf/weight_sync_seconds", float(self.rollout.sampler.sync_seconds))
        self.log("train/loss", stats["loss"], prog_bar=True, sync_dist=True)
        self.log("train/reward", scores.mean(), prog_bar=True, sync_dist=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        if self.log_samples_every and not batch_idx % self.log_samples_every and self.trainer.is_global_zero:
            completions = replies.scores.completions if replies.episodes is None else [  # the whole episode
                self.tokenizer.decode(e.tokens, skip_special_tokens=False) for e in replies.episodes]
            rows = [[self.global_step, p, c, round(float(s), 4)]
                    for p, c, s in list(zip(replies.prompts, completions, scores))[:4]]
            self._sample_rows += rows
            record_table(self.trainer, "rollouts", ["step", "prompt", "completion", "reward"], rows, self._sample_rows)

    # -- validation: mean reward of the policy's replies to held-out prompts ---------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        replies = self.rollout(self.model, batch, seed=self.rollout_seed(-1, batch_idx), validation=True,
                               version=self.global_step)
        scores = replies.scores.total
        stats = {"reward": scores.sum(), "response_length": replies.sample.response_mask.sum().float(),
                 **{f"reward/{k}": v.sum() for k, v in replies.scores.components.items()}}
        if replies.episodes is not None:  # sums: the validation loop divides by the number of replies
            stats.update({k: scores.new_tensor(v * (1 if k in ("tool_errors", "parse_failures") else len(replies.episodes)))
                          for k, v in episode_metrics(replies.episodes).items()})
        self._accumulate_val(None, stats, scores.shape[0])


class StepMeans:
    """Loss and stats of the optimiser steps of one iteration, averaged over those steps."""

    def __init__(self):
        self.totals: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        for k, v in {"loss": loss, **stats}.items():
            self.totals[k] = self.totals.get(k, 0) + v
        self.steps += 1

    def means(self) -> dict[str, torch.Tensor]:
        return {k: v / self.steps for k, v in self.totals.items()}
