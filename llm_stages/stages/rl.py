"""What the RL stages (PPO, GRPO) share: sampling replies to prompts, scoring them, per-token
log-probs, the minibatch epochs over a rollout buffer, and validation by reward.

One training step of an RL stage is one iteration: a batch of prompts from the data module is
answered, scored and turned into a `RolloutBuffer`, then the policy takes
`ppo_epochs * len(buffer) / mini_batch_size` optimiser steps on it. Lightning's `global_step`
(and so `trainer.max_steps`) counts those optimiser steps; `val_check_interval` counts iterations.

Sampling is seeded by (seed, iteration, rank), so a resumed run draws the same replies as an
uninterrupted one without saving RNG state; a buffer never outlives its iteration, so a
checkpoint (always written between iterations) holds no half-used buffer.
"""

from __future__ import annotations

import logging
import time

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from callbacks.generation_samples import record_table
from llm_stages.adapters import frozen_reference, reference_of
from llm_stages.data.collate import PromptBatch, collate_causal
from llm_stages.data.render import Example
from llm_stages.data.reward_sequence import reply_end, reward_sequence
from llm_stages.errors import ConfigError
from llm_stages.losses.rl import entropy_from_logits
from llm_stages.models import load_model, load_tokenizer
from llm_stages.rollout import RolloutBuffer, Sample, SampledLogprobs, Trajectory, disable_dropout, generation_defaults
from llm_stages.stages.base import Stage
from llm_stages.stages.reward import reward_scores

log = logging.getLogger(__name__)

# What the loss's log-probs model of sampling (softmax of logits / temperature; top_k and top_p
# truncate it). generate() would take anything else (repetition_penalty, no_repeat_ngram_size, ...)
# from the checkpoint's generation_config.json, and the ratio would compare different distributions.
SAMPLING_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample")
NOT_SAMPLING = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                "max_length", "use_cache")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift a prompt."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def load_reward_model(path: str, tokenizer, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen scalar-head reward model (an RM stage export), which must share the policy's vocabulary."""
    cfg = OmegaConf.create({"name": "reward_model", "path": str(path), "dtype": str(dtype).removeprefix("torch.")})
    if load_tokenizer(cfg).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the reward model at {path} uses a different vocabulary than the policy; scoring "
                          "replies token for token needs the same tokenizer (train the RM from the same base model)")
    return load_model(cfg, tokenizer, head="reward").eval().requires_grad_(False)


def _reward_fn(name: str, spec) -> tuple:
    if not hasattr(spec, "get") or not callable(spec.get("fn")):
        raise ConfigError(f"module.rewards.{name} must be {{weight: w, fn: {{_target_: <function>, _partial_: true}}}}; "
                          f"got {spec!r}")
    return spec["fn"], float(spec.get("weight", 1.0))


class RLStage(Stage):
    fsdp1_unsupported = "the RL stages generate and call model parts outside the sharded model's forward"

    def __init__(self, model, tokenizer, optim, *, generation: dict, val_generation: dict | None = None,
                 rewards: dict | None = None, reward_model: dict | None = None, missing_eos_penalty: float | None = None,
                 ppo_epochs: int = 1, mini_batch_size: int = 8, micro_batch_size: int | None = None,
                 log_samples_every: int = 10, seed: int = 0, reference: bool = True):
        """`rewards`: {name: {fn: <rule reward, see llm_stages.rewards>, weight: w}}; `reward_model`:
        {path: <RM export>, weight: w} or null. A reply's score is the weighted sum of all of them."""
        super().__init__(model, tokenizer, optim)
        self.generation = dict(generation)
        self.val_generation = {**self.generation, **dict(val_generation or {})}
        for name in {**self.generation, **self.val_generation}:
            if name not in (*SAMPLING_SETTINGS, "batch_size"):
                raise ConfigError(f"module.generation.{name}: RL sampling takes only {', '.join(SAMPLING_SETTINGS)} and "
                                  "batch_size, the settings the loss's log-probs model")
        disable_dropout(model)
        self.reward_fns = {name: _reward_fn(name, spec) for name, spec in (rewards or {}).items()}
        self.reward_model, self.reward_model_weight = None, 0.0
        if reward_model and reward_model.get("path"):
            dtype = next(model.parameters()).dtype
            self.reward_model = load_reward_model(reward_model["path"], tokenizer, dtype)
            self.reward_model_weight = float(reward_model.get("weight", 1.0))
        if not self.reward_fns and self.reward_model is None:
            raise ConfigError("an RL stage needs a reward: module.reward_model.path (an RM export) and/or "
                              "module.rewards (rule functions, see llm_stages.rewards)")
        self.missing_eos_penalty = missing_eos_penalty
        self.ppo_epochs, self.mini_batch_size = ppo_epochs, mini_batch_size
        self.micro_batch_size = micro_batch_size or mini_batch_size
        if mini_batch_size % self.micro_batch_size:
            raise ConfigError(f"module.mini_batch_size={mini_batch_size} must be a multiple of "
                              f"module.micro_batch_size={self.micro_batch_size}")
        self.log_samples_every, self.seed = log_samples_every, seed
        # The frozen reference is the initial policy.
        # (Under LoRA, the policy with its adapter switched off: see reference_logprobs.)
        self.reference = frozen_reference(model) if reference else None
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.reply_end = reply_end(tokenizer, self.eos_ids)
        self._log_ignored_generation_settings(model)
        self.generation_seconds = self.update_seconds = float("nan")
        self._sample_rows: list[list] = []
        self._logprob_diffs: list[torch.Tensor] = []

    @staticmethod
    def _eos_ids(model, tokenizer) -> list[int]:
        ids = {tokenizer.eos_token_id}
        configured = getattr(model.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return sorted(i for i in ids if i is not None)

    @staticmethod
    def _log_ignored_generation_settings(model) -> None:
        settings = model.generation_config.to_diff_dict() if getattr(model, "generation_config", None) else {}
        ignored = {k: v for k, v in settings.items() if k not in (*SAMPLING_SETTINGS, *NOT_SAMPLING)}
        if ignored:
            log.warning("RL sampling ignores the checkpoint's generation_config %s: the loss models only %s "
                        "(module.generation)", ignored, ", ".join(SAMPLING_SETTINGS))

    def generation_config(self, generation: dict) -> GenerationConfig:
        """Exactly the sampling the loss models: `generation`'s settings, and nothing from the checkpoint."""
        sample = generation.get("do_sample", True)
        settings = {"temperature": generation.get("temperature") or 1.0, "top_p": generation.get("top_p") or 1.0,
                    "top_k": generation.get("top_k") or 0} if sample else {}
        return GenerationConfig(max_new_tokens=generation["max_new_tokens"], do_sample=sample, **settings,
                                eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                                bos_token_id=self.tokenizer.bos_token_id)

    # -- rollout ---------------------------------------------------------------------------------
    def _seed(self, *parts: int) -> int:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return hash((self.seed, rank, *parts)) % (2 ** 31)

    @torch.no_grad()
    def sample(self, prompts: PromptBatch, *, repeats: int = 1, generation: dict, seed: int):
        """Replies to each prompt (`repeats` per prompt, consecutive), with the sampling-time log-prob
        of each reply token (see SampledLogprobs); the mask covers each reply through its first EOS."""
        query = prompts.input_ids.repeat_interleave(repeats, 0)
        query_mask = prompts.attention_mask.repeat_interleave(repeats, 0)
        chunk = generation.get("batch_size") or query.shape[0]
        config = self.generation_config(generation)
        was_training, started = self.model.training, time.perf_counter()
        self.model.eval()  # also turns gradient checkpointing off, so generation uses the KV cache
        responses, logprobs = [], []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), generation_defaults(self.model, config):
            torch.manual_seed(seed)
            for start in range(0, query.shape[0], chunk):
                recorder = SampledLogprobs(config.temperature if config.do_sample else 1.0)
                rows = slice(start, start + chunk)
                out = self.model.generate(input_ids=query[rows], attention_mask=query_mask[rows], generation_config=config,
                                          logits_processor=[recorder], use_cache=True)
                responses.append(out[:, query.shape[1]:])
                logprobs.append(recorder.finish(responses[-1]))
        self.model.train(was_training)
        self.generation_seconds = time.perf_counter() - started
        width = max(r.shape[1] for r in responses)
        pad = lambda x, value: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)  # noqa: E731
        response = torch.cat([pad(r, self.tokenizer.pad_token_id) for r in responses])
        is_eos = torch.isin(response, torch.tensor(self.eos_ids, device=response.device))
        response_mask = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).long()  # through the first EOS
        response = response.masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
        sampled = torch.where(response_mask.bool(), torch.cat([pad(lp, 0.0) for lp in logprobs]), 0.0)
        return Sample(query, query_mask, response, response_mask, sampled)

    @torch.no_grad()
    def reference_logprobs(self, trajectory: Trajectory) -> torch.Tensor:
        with reference_of(self.model, self.reference) as reference:
            return self.response_logprobs(reference, trajectory)[0]

    def response_logprobs(self, model, trajectory: Trajectory, *, with_entropy: bool = False):
        """Per-token log-probs of the sampled replies under `model` (at the sampling temperature),
        and optionally the per-token entropy; (N, R) each."""
        response = trajectory.response
        mask = trajectory.attention_mask
        # Only the positions that predict reply tokens go through the LM head.
        logits = model(input_ids=trajectory.input_ids, attention_mask=mask, position_ids=position_ids(mask),
                       use_cache=False, logits_to_keep=response.shape[1] + 1).logits[:, :-1].float()
        temperature = self.generation.get("temperature") or 1.0
        logits = logits / temperature
        logprobs = torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
        entropy = entropy_from_logits(logits) if with_entropy else None
        return logprobs, entropy

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, prompts: list[str], answers: list, query, query_mask, response, response_mask):
        """Each reply's score (N,) = weighted sum of rule rewards and the reward model, minus
        `missing_eos_penalty` for replies cut off before EOS; and each component (N,) by name."""
        completions = self.tokenizer.batch_decode(response, skip_special_tokens=True)
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(response.shape[0], device=self.device)
        for name, (fn, weight) in self.reward_fns.items():
            values = torch.tensor(fn(completions, prompts=prompts, answers=answers), dtype=torch.float32,
                                  device=self.device)
            if values.shape != total.shape:
                raise ConfigError(f"reward function {name!r} returned {tuple(values.shape)} values for {len(completions)} replies")
            components[name] = values
            total += weight * values
        if self.reward_model is not None:
            # The sequence the RM was trained on: prompt, reply, and the template's text after its EOS.
            rows = [reward_sequence(q[qm.bool()].tolist(), r[rm.bool()].tolist(), self.reply_end)
                    for q, qm, r, rm in zip(query, query_mask, response, response_mask)]
            batch = collate_causal([Example(row, row) for row in rows], self.tokenizer.pad_token_id)  # right-padded
            values = reward_scores(self.reward_model, batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
            components["reward_model"] = values
            total += self.reward_model_weight * values
        if self.missing_eos_penalty:
            ended = torch.isin(response, torch.tensor(self.eos_ids, device=response.device)).any(1)
            total -= self.missing_eos_penalty * (~ended).float()
        return total, components, completions

    # -- updates ---------------------------------------------------------------------------------
    def update(self, buffer: RolloutBuffer, loss_sum, loss_weight) -> dict[str, torch.Tensor]:
        """`ppo_epochs` passes over the buffer in shuffled minibatches, one optimiser step per
        minibatch (split into micro-batches for memory); returns loss and stats averaged over minibatches."""
        if len(buffer) % self.mini_batch_size:
            raise ConfigError(f"module.mini_batch_size={self.mini_batch_size} must divide the {len(buffer)} "
                              "replies of one rollout per device")
        totals: dict[str, torch.Tensor] = {}
        steps, seed, started = 0, self._seed(self.global_step), time.perf_counter()
        for epoch in range(self.ppo_epochs):
            for minibatch in buffer.minibatches(self.mini_batch_size, seed=seed, epoch=epoch):
                micro = [minibatch.rows(slice(i, i + self.micro_batch_size))
                         for i in range(0, self.mini_batch_size, self.micro_batch_size)]
                loss, stats = self.accumulated_step(micro, loss_sum, loss_weight)
                for k, v in {"loss": loss, **stats}.items():
                    totals[k] = totals.get(k, 0) + v
                steps += 1
        self.update_seconds = time.perf_counter() - started
        return {k: v / steps for k, v in totals.items()}

    def track_logprob_diff(self, sampled: torch.Tensor, trained: torch.Tensor, mask: torch.Tensor) -> None:
        """Notes |sampling-time - training-time log-prob| of reply tokens, logged per iteration as
        rollout/logprob_diff_max and _mean: near 1e-6 when sampling draws from the distribution the loss assumes."""
        self._logprob_diffs.append((sampled - trained.detach()).abs()[mask.bool()].float())

    # -- logging ---------------------------------------------------------------------------------
    def log_rollout(self, prefix: str, stats: dict[str, torch.Tensor], scores, components, response_mask) -> None:
        """Per-iteration statistics, averaged over ranks."""
        logged = {f"{prefix}/{k}": v for k, v in stats.items()}
        logged.update({"env/reward_mean": scores.mean(), "env/reward_std": scores.std() if scores.numel() > 1 else scores.new_zeros(()),
                       "env/response_length": response_mask.sum(1).float().mean()})
        logged.update({f"env/reward/{k}": v.mean() for k, v in components.items()})
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
        self.log("train/loss", stats["loss"], prog_bar=True, sync_dist=True)
        self.log("train/reward", scores.mean(), prog_bar=True, sync_dist=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])

    def record_samples(self, batch_idx: int, prompts: list[str], completions: list[str], scores) -> None:
        """Every `log_samples_every` iterations, a few rollouts into `<run dir>/rollouts.jsonl` and the W&B table `rollouts`."""
        if not self.log_samples_every or batch_idx % self.log_samples_every or not self.trainer.is_global_zero:
            return
        rows = [[self.global_step, p, c, round(float(s), 4)] for p, c, s in list(zip(prompts, completions, scores))[:4]]
        self._sample_rows += rows
        record_table(self.trainer, "rollouts", ["step", "prompt", "completion", "reward"], rows, self._sample_rows)

    # -- validation: mean reward of the policy's replies to held-out prompts ---------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        query, query_mask, response, response_mask, _ = self.sample(batch, generation=self.val_generation,
                                                                    seed=self._seed(-1, batch_idx))
        scores, components, _ = self.score(batch.prompts, batch.answers, query, query_mask, response, response_mask)
        stats = {"reward": scores.sum(), "response_length": response_mask.sum().float(),
                 **{f"reward/{k}": v.sum() for k, v in components.items()}}
        self._accumulate_val(None, stats, scores.shape[0])
