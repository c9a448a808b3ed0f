"""DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476; verl recipe/dapo `filter_groups`), off by
default (`module.dynamic_sampling`, `module.max_extra_rounds`, GRPO only). A group whose replies all
scored the same has zero advantage under a group baseline and carries no gradient: such groups are
dropped and the next prompt batches answered until the batch of groups is full again, with at most
`max_extra_rounds` more rollouts. If still short, dropped groups fill the rest, so a batch keeps its
shape (and its minibatch split) and the loss only spends compute where there was nothing better.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from llm_stages.rollout.rollout import Replies, Scores
from llm_stages.rollout.sampling import Sample


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) True where the replies of a prompt did not all score the same."""
    grouped = scores.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(1)


class Filled(NamedTuple):
    replies: Replies  # as many groups as the first rollout, informative ones first
    kept_groups: int  # informative groups in `replies`
    dropped_groups: int  # groups left out or used only to fill (all replies equal), over all rounds
    extra_rounds: int  # rollouts after the first


def fill_informative_groups(first: Replies, next_rollout: Callable[[int], Replies | None], *, group_size: int,
                            max_extra_rounds: int, pad_token_id: int,
                            shortfall_anywhere: Callable[[int], int] = lambda short: short) -> Filled:
    """Keeps the informative groups of `first` and of `next_rollout(round)` (replies to the next
    prompts; None when none are left) until there are as many as `first` had groups or
    `max_extra_rounds` more rollouts were made. `shortfall_anywhere(short)` sums the shortfall over
    data-parallel ranks, so every rank makes the same number of rollouts."""
    target = first.scores.total.shape[0] // group_size
    kept: list[Replies] = []
    dropped: list[Replies] = []
    replies, rounds, dropped_count, seconds = first, 0, 0, 0.0
    while True:
        seconds += replies.generation_seconds
        informative = informative_groups(replies.scores.total, group_size)
        kept.append(select_groups(replies, informative, group_size))
        dropped.append(select_groups(replies, ~informative, group_size))
        dropped_count += int((~informative).sum())
        have = sum(len(r.prompts) for r in kept) // group_size
        if rounds == max_extra_rounds or shortfall_anywhere(max(target - have, 0)) == 0:
            break
        replies = next_rollout(rounds + 1)
        if replies is None:
            break
        rounds += 1
    # kept and dropped are parts of the same rollouts: the time is that of the rollouts, counted once
    merged = concat_replies(kept + dropped, pad_token_id, generation_seconds=seconds)
    take = torch.arange(target * group_size, device=merged.scores.total.device)
    return Filled(select_rows(merged, take), min(have, target), dropped_count, rounds)


def select_groups(replies: Replies, groups: torch.Tensor, group_size: int) -> Replies:
    """The replies of the groups marked in `groups` (groups,)."""
    return select_rows(replies, groups.repeat_interleave(group_size).nonzero().squeeze(1))


def select_rows(replies: Replies, rows: torch.Tensor) -> Replies:
    sample, scores = replies.sample, replies.scores
    index = rows.tolist()
    return Replies(sample.rows(rows),
                   Scores(scores.total[rows], {k: v[rows] for k, v in scores.components.items()},
                          [scores.completions[i] for i in index]),
                   [replies.prompts[i] for i in index], replies.generation_seconds,
                   None if replies.episodes is None else [replies.episodes[i] for i in index])


def concat_replies(parts: list[Replies], pad_token_id: int, *, generation_seconds: float) -> Replies:
    """Rollouts stacked, prompts left-padded and replies right-padded to the widest."""
    prompt_width = max(p.sample.query.shape[1] for p in parts)
    reply_width = max(p.sample.response.shape[1] for p in parts)
    left = lambda x, value: F.pad(x, (prompt_width - x.shape[1], 0), value=value)  # noqa: E731
    right = lambda x, value: F.pad(x, (0, reply_width - x.shape[1]), value=value)  # noqa: E731
    samples = [p.sample for p in parts]
    sample = Sample(torch.cat([left(s.query, pad_token_id) for s in samples]),
                    torch.cat([left(s.query_mask, 0) for s in samples]),
                    torch.cat([right(s.response, pad_token_id) for s in samples]),
                    torch.cat([right(s.response_mask, 0) for s in samples]),
                    torch.cat([right(s.sampled_logprobs, 0.0) for s in samples]),
                    torch.cat([right(s.observation_mask, 0) for s in samples]))
    names = parts[0].scores.components
    scores = Scores(torch.cat([p.scores.total for p in parts]),
                    {k: torch.cat([p.scores.components[k] for p in parts]) for k in names},
                    [c for p in parts for c in p.scores.completions])
    episodes = None if any(p.episodes is None for p in parts) else [e for p in parts for e in p.episodes]
    return Replies(sample, scores, [q for p in parts for q in p.prompts], generation_seconds, episodes)
