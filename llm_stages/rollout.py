"""Trajectories of RL stages and the buffer their minibatch epochs iterate over."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch


class Trajectory(NamedTuple):
    """A batch of sampled replies and everything the updates need, one row per reply.
    Prompts are left-padded to a common length P, replies right-padded to R."""

    query: torch.Tensor  # (N, P) prompt ids
    query_mask: torch.Tensor  # (N, P) 1 on prompt tokens
    response: torch.Tensor  # (N, R) sampled ids
    response_mask: torch.Tensor  # (N, R) 1 up to and including EOS
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

