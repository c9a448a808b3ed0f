"""An RL rollout: replies sampled to a batch of prompts, each scored. `Rollout` (built by Hydra from `rollout:`)
is a sampler (the policy's `generate` with only the settings the loss models) and scorers (rule rewards
and/or a reward model) returning one complete `Replies`; the stages make it a `Trajectory` (`RolloutBuffer`).

Sampling is seeded by the caller (PPO and GRPO: by seed, iteration and rank), so a resumed run
draws the same replies as an uninterrupted one without saving RNG state.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, NamedTuple

import torch

from llm_stages.data.collate import collate_causal
from llm_stages.data.kinds.prompt import PromptBatch
from llm_stages.data.render import Example
from llm_stages.data.reward_sequence import reply_end, reward_sequence
from llm_stages.errors import ConfigError
from llm_stages.models import load_model, load_tokenizer, reward_scores
from llm_stages.rollout.episodes import Episode, EpisodeLimits, EpisodeRunner
from llm_stages.rollout.overlong import overlong_penalty
from llm_stages.rollout.decode import position_ids  # noqa: F401  (the stages import it from here)
from llm_stages.rollout.sampling import Sample, Sampler
from llm_stages.rollout.tools import tool_from_callable


class Scores(NamedTuple):
    total: torch.Tensor  # (N,) weighted sum of every reward, minus missing_eos_penalty where a reply never ended
    components: dict[str, torch.Tensor]  # (N,) each reward by name ("reward_model" for the RM)
    completions: list[str]  # the decoded replies


class Replies(NamedTuple):
    """What one rollout returns: the sampled replies, their scores, the prompt of each reply."""

    sample: Sample
    scores: Scores
    prompts: list[str]  # one per reply (a prompt answered k times appears k times)
    generation_seconds: float
    episodes: list[Episode] | None = None  # one per reply when the rollout runs episodes (rollout.tools / environment)


class Trajectory(NamedTuple):
    """A batch of sampled replies and everything the updates need, one row per reply.
    Prompts are left-padded to a common length P, replies right-padded to R."""

    query: torch.Tensor  # (N, P) prompt ids
    query_mask: torch.Tensor  # (N, P) 1 on prompt tokens
    response: torch.Tensor  # (N, R) sampled ids
    response_mask: torch.Tensor  # (N, R) 1 on the tokens the policy sampled (Sample.response_mask)
    sampled_logprobs: torch.Tensor  # (N, R) at sampling time, to compare with the training forward's
    logprobs: torch.Tensor  # (N, R) of the policy that sampled (the "old" policy of the ratio)
    ref_logprobs: torch.Tensor  # (N, R) of the frozen reference (zeros when no KL term)
    values: torch.Tensor  # (N, R) critic values (zeros for GRPO)
    rewards: torch.Tensor  # (N, R) per-token rewards (PPO: KL penalty + score on the last token; GRPO: zeros)
    advantages: torch.Tensor  # (N, R)
    returns: torch.Tensor  # (N, R) value targets (PPO; GRPO: zeros)
    scores: torch.Tensor  # (N,) sequence reward before shaping
    observation_mask: torch.Tensor  # (N, R) 1 on the tokens an environment added inside an episode

    @classmethod
    def from_sample(cls, sample: Sample, *, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, advantages: torch.Tensor,
                    scores: torch.Tensor, values: torch.Tensor | None = None, rewards: torch.Tensor | None = None,
                    returns: torch.Tensor | None = None) -> "Trajectory":
        """The complete trajectory of `sample`; the per-token fields an algorithm has no use for (GRPO:
        values, rewards, returns) are zeros."""
        zeros = torch.zeros(sample.response_mask.shape, device=sample.response_mask.device)
        return cls(sample.query, sample.query_mask, sample.response, sample.response_mask, sample.sampled_logprobs,
                   logprobs=logprobs, ref_logprobs=ref_logprobs, values=zeros if values is None else values,
                   rewards=zeros if rewards is None else rewards, advantages=advantages,
                   returns=zeros if returns is None else returns, scores=scores,
                   observation_mask=sample.observation_mask)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask | self.observation_mask], 1)

    def rows(self, index: torch.Tensor) -> "Trajectory":
        return Trajectory(*(field[index] for field in self))


class RolloutBuffer:
    """Experiences of one rollout phase, served as shuffled minibatches: each epoch is a fresh
    permutation, so every experience is used exactly once per epoch. The order is drawn from a
    generator seeded by (seed, step, epoch), so a resumed run replays the same minibatches."""

    def __init__(self, trajectory: Trajectory):
        self.trajectory = trajectory

    def __len__(self) -> int:
        return self.trajectory.query.shape[0]

    def minibatches(self, size: int, *, seed: int, epoch: int = 0) -> Iterator[Trajectory]:
        if len(self) % size:
            raise ValueError(f"{len(self)} experiences do not split into minibatches of {size}")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self), generator=generator).to(self.trajectory.query.device)
        for start in range(0, len(self), size):
            yield self.trajectory.rows(order[start:start + size])


class Scorer(torch.nn.Module):
    """A reply's score: the weighted sum of rule rewards (`rewards`: {name: {fn: <see llm_stages.rollout.rewards>,
    weight: w}}) and a reward model (`reward_model`: a model config {path: <RM export>, dtype} and a
    weight), minus `missing_eos_penalty` for replies cut off before EOS, plus DAPO's `overlong` penalty
    (llm_stages.rollout.overlong). Episodes add the reward of an environment that owns one (its
    `get_reward()`, weight 1, named after its class), and `context_overflow_reward` replaces the
    score of an episode stopped by the token limits (None: scored as it stands).
    A module, so the reward model moves with the stage (frozen: checkpoints leave it out)."""

    def __init__(self, tokenizer, eos: list[int], *, rewards: dict | None, reward_model: dict | None,
                 missing_eos_penalty: float | None, overlong: tuple[int, int, float] | None = None,
                 environment_reward: bool = False, context_overflow_reward: float | None = None):
        super().__init__()
        self.rewards = {name: _rule_reward(name, spec) for name, spec in (rewards or {}).items()}
        self.reward_model, self.reward_model_weight = None, 0.0
        if reward_model and reward_model.get("path"):
            self.reward_model = load_reward_model(reward_model, tokenizer)
            self.reward_model_weight = float(reward_model.get("weight", 1.0))
        if not self.rewards and self.reward_model is None and not environment_reward:
            raise ConfigError("an RL stage needs a reward: rollout.reward_model.path (an RM export) and/or "
                              "rollout.rewards (rule functions, see llm_stages.rollout.rewards), or an "
                              "environment with get_reward()")
        self.context_overflow_reward = context_overflow_reward
        self.tokenizer, self.eos_ids, self.missing_eos_penalty = tokenizer, eos, missing_eos_penalty
        self.overlong = overlong  # (max_new_tokens, overlong_buffer, overlong_penalty_factor), or None
        self.reply_end = reply_end(tokenizer, eos)

    @torch.no_grad()
    def score(self, prompts: list[str], answers: list, sample: Sample, *, fields: list | None = None,
              episodes: list[Episode] | None = None) -> Scores:
        """Each reply's score. Rule rewards are called as fn(completions, prompts=, answers=, fields=) and,
        for episodes, also episodes= and environments=; an episode's completion is its final assistant turn."""
        query, query_mask, response, response_mask = sample[:4]
        device = response.device
        completions = [e.final_text for e in episodes] if episodes is not None else \
            self.tokenizer.batch_decode(response, skip_special_tokens=True)
        inputs = {"prompts": prompts, "answers": answers, "fields": fields or [None] * len(completions)}
        if episodes is not None:
            inputs.update(episodes=episodes, environments=[e.environment for e in episodes])
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(response.shape[0], device=device)
        for name, (fn, weight) in self.rewards.items():
            values = torch.tensor(fn(completions, **inputs), dtype=torch.float32, device=device)
            if values.shape != total.shape:
                raise ConfigError(f"reward function {name!r} returned {tuple(values.shape)} values for {len(completions)} replies")
            components[name] = values
            total += weight * values
        for name, values in environment_rewards(episodes or []).items():
            components[name] = values.to(device)
            total += components[name]
        if self.reward_model is not None:
            # The sequence the RM was trained on: prompt, reply (an episode's tool turns included), and
            # the template's text after its EOS.
            seen = response_mask | sample.observation_mask
            rows = [reward_sequence(q[qm.bool()].tolist(), r[rm.bool()].tolist(), self.reply_end)
                    for q, qm, r, rm in zip(query, query_mask, response, seen)]
            batch = collate_causal([Example(row, row) for row in rows], self.tokenizer.pad_token_id)  # right-padded
            values = reward_scores(self.reward_model, batch.input_ids.to(device), batch.attention_mask.to(device))
            components["reward_model"] = values
            total += self.reward_model_weight * values
        if self.missing_eos_penalty:
            ended = torch.isin(response, torch.tensor(self.eos_ids, device=device)).any(1) if episodes is None else \
                torch.tensor([not e.truncated for e in episodes], device=device)
            total -= self.missing_eos_penalty * (~ended).float()
        if self.overlong:
            components["overlong"] = overlong_penalty(response_mask.sum(1), *self.overlong)
            total += components["overlong"]
        if episodes is not None and self.context_overflow_reward is not None:
            overflow = torch.tensor([e.overflow for e in episodes], device=device)
            total = torch.where(overflow, torch.full_like(total, self.context_overflow_reward), total)
        return Scores(total, components, completions)


def environment_rewards(episodes: list[Episode]) -> dict[str, torch.Tensor]:
    """The rewards environments own (TRL's protocol: a `get_reward()` method), one component per
    environment class, 0 for episodes whose environment is another class."""
    names = {type(e.environment).__name__ for e in episodes if callable(getattr(e.environment, "get_reward", None))}
    return {name: torch.tensor([float(e.environment.get_reward()) if type(e.environment).__name__ == name else 0.0
                                for e in episodes], dtype=torch.float32) for name in sorted(names)}


def load_reward_model(model_cfg, tokenizer) -> torch.nn.Module:
    """A frozen scalar-head reward model (an RM export sharing the policy's vocabulary) as `model_cfg` says."""
    if load_tokenizer(model_cfg).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the reward model at {model_cfg.path} uses a different vocabulary than the policy; scoring "
                          "replies token for token needs the same tokenizer (train the RM from the same base model)")
    return load_model(model_cfg, tokenizer, head="reward", prefix="rollout.reward_model").eval().requires_grad_(False)


def _rule_reward(name: str, spec) -> tuple:
    if not hasattr(spec, "get") or not callable(spec.get("fn")):
        raise ConfigError(f"rollout.rewards.{name} must be {{weight: w, fn: {{_target_: <function>, _partial_: true}}}}; "
                          f"got {spec!r}")
    return spec["fn"], float(spec.get("weight", 1.0))


class Rollout(torch.nn.Module):
    """A sampler and its scorers: `rollout(policy, prompts, ...)` -> `Replies`. Hydra builds it from
    the `rollout:` node as a partial, which the stage completes with its policy and tokenizer."""

    def __init__(self, model, tokenizer, *, generation: dict, val_generation: dict | None = None,
                 rewards: dict | None = None, reward_model: dict | None = None, missing_eos_penalty: float | None = None,
                 overlong_buffer: int | None = None, overlong_penalty_factor: float = 1.0, backend: str = "hf",
                 vllm: dict | None = None, tools: list | None = None, environment: Callable | None = None,
                 episode: dict | None = None, context_overflow_reward: float | None = 0.0):
        """`tools` (functions) and/or `environment` (a class, TRL's environment_factory protocol) turn each
        reply into a multi-turn episode (llm_stages.rollout.episodes) with the limits of `episode`."""
        super().__init__()
        if backend == "vllm":
            from llm_stages.rollout.vllm_client import VLLMSampler

            self.sampler = VLLMSampler(model, tokenizer, generation, val_generation, settings=dict(vllm or {}))
        elif backend == "hf":
            self.sampler = Sampler(model, tokenizer, generation, val_generation)
        else:
            raise ConfigError(f"rollout.backend={backend!r}: use hf (the policy's generate) or vllm (make vllm first)")
        self.episodes = None
        if tools or environment is not None:
            self.episodes = EpisodeRunner(self.sampler, tokenizer, tools=[tool_from_callable(t) for t in tools or []],
                                          environment=environment, limits=episode_limits(episode),
                                          context_limit=model.config.max_position_embeddings)
        self.scorer = Scorer(tokenizer, self.sampler.eos_ids, rewards=rewards, reward_model=reward_model,
                             missing_eos_penalty=missing_eos_penalty, overlong=overlong_buffer and (
                                 generation["max_new_tokens"], overlong_buffer, overlong_penalty_factor),
                             environment_reward=callable(getattr(environment_class(environment), "get_reward", None)),
                             context_overflow_reward=context_overflow_reward)

    def forward(self, policy, prompts: PromptBatch, *, seed: int, repeats: int = 1, validation: bool = False,
                version: int | None = None) -> Replies:
        """`version`: the policy's optimiser step; a vLLM sampler is sent the weights when it changed (None: always)."""
        self.sampler.sync(policy, version)
        started = time.perf_counter()
        generation = self.sampler.val_generation if validation else self.sampler.generation
        episodes = None
        if self.episodes is not None:
            sample, episodes = self.episodes.run(policy, prompts, repeats=repeats, generation=generation, seed=seed)
        else:
            sample = self.sampler.sample(policy, prompts, repeats=repeats, generation=generation, seed=seed)
        seconds = time.perf_counter() - started
        each = lambda values: None if values is None else [v for v in values for _ in range(repeats)]  # noqa: E731
        repeated = each(prompts.prompts)
        scores = self.scorer.score(repeated, each(prompts.answers), sample, fields=each(prompts.fields), episodes=episodes)
        return Replies(sample, scores, repeated, seconds, episodes)

    def close(self) -> None:
        """Stops what the sampler runs beside the trainer (a vLLM server)."""
        self.sampler.close()


def episode_limits(settings: dict | None) -> EpisodeLimits:
    """`rollout.episode` as EpisodeLimits; an unknown key is an error naming the known ones."""
    settings = dict(settings or {})
    known = EpisodeLimits.__dataclass_fields__
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"rollout.episode.{unknown[0]}: no such setting; rollout.episode takes {', '.join(known)}")
    return EpisodeLimits(**settings)


def environment_class(environment: Callable | None):
    """The class a `rollout.environment` partial (or class, or factory function) builds, when it can be told."""
    target = getattr(environment, "func", environment)  # functools.partial (Hydra's _partial_: true)
    return target if isinstance(target, type) else None
