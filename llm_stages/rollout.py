"""Trajectories of RL stages, the buffer their minibatch epochs iterate over, and what sampling
needs to draw from the distribution the loss assumes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from transformers import GenerationConfig, LogitsProcessor

from llm_stages.adapters import is_adapted


class Sample(NamedTuple):
    """Sampled replies: prompts left-padded to P, replies right-padded to R."""

    query: torch.Tensor  # (N, P) prompt ids
    query_mask: torch.Tensor  # (N, P)
    response: torch.Tensor  # (N, R) sampled ids, padding after the first EOS
    response_mask: torch.Tensor  # (N, R) 1 up to and including EOS
    sampled_logprobs: torch.Tensor  # (N, R) each token's log-prob at sampling time (0 on padding)


class Trajectory(NamedTuple):
    """A batch of sampled replies and everything the updates need, one row per reply.
    Prompts are left-padded to a common length P, replies right-padded to R."""

    query: torch.Tensor  # (N, P) prompt ids
    query_mask: torch.Tensor  # (N, P) 1 on prompt tokens
    response: torch.Tensor  # (N, R) sampled ids
    response_mask: torch.Tensor  # (N, R) 1 up to and including EOS
    sampled_logprobs: torch.Tensor  # (N, R) at sampling time, to compare with the training forward's
    logprobs: torch.Tensor  # (N, R) of the policy that sampled (the "old" policy of the ratio)
    ref_logprobs: torch.Tensor  # (N, R) of the frozen reference (zeros when no KL term)
    values: torch.Tensor  # (N, R) critic values (zeros for GRPO)
    rewards: torch.Tensor  # (N, R) per-token rewards (PPO: KL penalty + score on the last token)
    advantages: torch.Tensor  # (N, R)
    returns: torch.Tensor  # (N, R) value targets (PPO)
    scores: torch.Tensor  # (N,) sequence reward before shaping

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], 1)

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

    def state_dict(self) -> dict:
        return {"trajectory": {k: v.cpu() for k, v in self.trajectory._asdict().items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RolloutBuffer":
        return cls(Trajectory(**state["trajectory"]))



def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every layer, also in train mode (which gradient checkpointing needs): the
    ratio of a PPO/GRPO update compares log-probs of two forward passes, and dropout would make it
    differ from 1 before any update (as TRL does; HF attention applies its dropout from a float attribute)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class SampledLogprobs(LogitsProcessor):
    """Records each generated token's log-prob under the logits generate() samples it from, at the
    sampling temperature (after every other logits processor, before top-k/top-p truncation, which
    the loss does not model either). A processor sees a step's token only at the next step, so the
    last token is read by `finish`."""

    def __init__(self, temperature: float):
        self.temperature, self.steps, self.previous = temperature, [], None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._read(input_ids[:, -1])
        # The scores themselves (generate's processors do not change them in place) and their
        # normaliser: no (rows x vocabulary) copy is kept from one step to the next.
        self.previous = scores, torch.logsumexp(scores.float() / self.temperature, -1)
        return scores

    def _read(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            scores, normaliser = self.previous
            self.steps.append(scores.gather(-1, tokens[:, None]).squeeze(-1).float() / self.temperature - normaliser)
            self.previous = None

    def finish(self, response: torch.Tensor) -> torch.Tensor:
        """(N, R) log-probs of `response`, the generated tokens."""
        self._read(response[:, -1])
        return torch.stack(self.steps, 1)


@contextmanager
def generation_defaults(model: torch.nn.Module, config: GenerationConfig):
    """`config` as the model's generation config while generating: generate() fills every setting
    left unset from the model's own config (the checkpoint's generation_config.json), so passing
    `config` alone would not keep a repetition_penalty out."""
    hf_model = model.get_base_model() if is_adapted(model) else model
    saved, hf_model.generation_config = hf_model.generation_config, config
    try:
        yield
    finally:
        hf_model.generation_config = saved
