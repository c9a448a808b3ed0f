"""Replies that answer the same prompt (GRPO's group) scored with that prompt forwarded once: the group
is laid out as `[prompt, reply_1, ..., reply_k]` in one row, with a 4-D attention mask in which each
reply's tokens see the prompt and their own reply (causally) but no other reply, and each reply's
positions continue from the prompt's end. Every reply token then has exactly the hidden state it has in
its own `[prompt, reply]` row (llm_stages.data.kinds.shared_pair does the same for preference pairs),
so log-probs and their gradients equal the one-row-per-reply layout's to float rounding, for one
forward (and backward) pass over the prompt instead of k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SharedPromptRows(NamedTuple):
    input_ids: torch.Tensor  # (groups, W)
    attention_mask: torch.Tensor  # (groups, 1, W, W) bool, True = may attend
    position_ids: torch.Tensor  # (groups, W)
    # For reply token (i, t) that is scored: row, column of the position whose output predicts it, and
    # the token; `index` are the (i, t) themselves (flat indices into the (N, R) reply grid).
    source_row: torch.Tensor
    source_column: torch.Tensor
    index: torch.Tensor
    tokens: torch.Tensor


def prompt_groups(query: torch.Tensor, query_mask: torch.Tensor) -> list[list[int]]:
    """Rows with the same prompt (ids and mask), each group in row order, groups in order of their first row."""
    _, group_of = torch.unique(query.masked_fill(query_mask == 0, -1), dim=0, return_inverse=True)
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(group_of.tolist()):
        groups.setdefault(group, []).append(row)
    return list(groups.values())


def reply_extent(seen: torch.Tensor) -> torch.Tensor:
    """(N,) how many leading reply tokens each row holds: through its last token that is attended to."""
    columns = torch.arange(1, seen.shape[1] + 1, device=seen.device)
    return (seen.bool() * columns).amax(1)


def token_saving(query_mask: torch.Tensor, seen: torch.Tensor, groups: list[list[int]]) -> float:
    """The fraction of the real tokens of one row per reply that forwarding each prompt once saves."""
    prompt, reply = query_mask.sum(1), reply_extent(seen)
    unshared = int((prompt + reply).sum())
    shared = int(reply.sum()) + sum(int(prompt[g[0]]) for g in groups)
    return 1 - shared / max(unshared, 1)


def share_prompts(query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, seen: torch.Tensor,
                  groups: list[list[int]]) -> SharedPromptRows:
    """One row per group of `groups` (prompt_groups): the prompt's real tokens, then each reply's tokens
    through its last attended one (`seen`: 1 on the reply tokens the model reads, i.e. the sampled ones
    and, in an episode, the environment's). Tokens inside that extent that are not `seen` are never attended to, as in
    the one-row layout. Padding after a row's end attends to the prompt."""
    device, (n, width_r) = query.device, response.shape
    prompt_lengths, extents = query_mask.sum(1).tolist(), reply_extent(seen).tolist()
    width = max(prompt_lengths[g[0]] + sum(extents[i] for i in g) for g in groups)
    shape = (len(groups), width)
    input_ids = torch.zeros(shape, dtype=torch.long, device=device)
    position_ids = torch.zeros(shape, dtype=torch.long, device=device)
    block = torch.arange(width, device=device).repeat(len(groups), 1) + width + 1  # padding: each its own block
    attended = torch.zeros(shape, dtype=torch.bool, device=device)
    source_row, source_column, index = [], [], []
    for r, group in enumerate(groups):
        p = prompt_lengths[group[0]]
        input_ids[r, :p] = query[group[0]][query_mask[group[0]].bool()]
        position_ids[r, :p] = torch.arange(p, device=device)
        block[r, :p], attended[r, :p] = 0, True
        offset = p
        for k, i in enumerate(group, start=1):
            e = extents[i]
            if e == 0:
                continue
            reply_seen = seen[i, :e].bool()
            input_ids[r, offset:offset + e] = response[i, :e]
            # Counted over attended tokens only, as the one-row layout's position_ids over its mask.
            position_ids[r, offset:offset + e] = p + (reply_seen.long().cumsum(0) - 1).clamp(min=0)
            block[r, offset:offset + e], attended[r, offset:offset + e] = k, reply_seen
            # Reply token t is predicted by the token before it: the prompt's last for t = 0.
            columns = torch.arange(offset - 1, offset + e - 1, device=device)
            columns[0] = p - 1
            source_row.append(torch.full((e,), r, device=device))
            source_column.append(columns)
            index.append(i * width_r + torch.arange(e, device=device))
            offset += e
    same_block = (block[:, :, None] == block[:, None, :]) | (block[:, None, :] == 0)  # own reply, or the prompt
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool, device=device))
    mask = same_block & causal & attended[:, None, :]  # every position sees the prompt's first token: no row is empty
    index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=device)
    return SharedPromptRows(input_ids, mask[:, None], position_ids,
                            torch.cat(source_row) if source_row else index, torch.cat(source_column) if source_column else index,
                            index, response.reshape(-1)[index])
