"""Preference pairs with their prompt forwarded once (Wang & Hegde, arXiv 2410.20305): a pair is laid
out as `[prompt, chosen, rejected]` in one row, with a 4-D attention mask in which chosen tokens see
the prompt and chosen (causally) and rejected tokens see the prompt and rejected but not chosen, and
rejected positions restart right after the prompt. Every reply token then has exactly the hidden
state it has in its own `[prompt, reply]` row, so log-probs and rewards equal the two-row layout's (to float
rounding) for one forward pass over the prompt instead of two.

Several pairs can share a row (`pack=True`): blocks of the mask, first-fit-decreasing into rows no
longer than the micro-batch's longest pair, so packing never adds padded positions.

What a stage reads from a `SharedPairBatch` (llm_stages.stages.pair_scoring): for every reply token
the position whose logits predict it (`predictor`: the token before it, but the prompt's last token
for the first rejected token) and which of the 2 x pairs sequences it belongs to (`sequence`:
chosen sequences first, then rejected, as `PairBatch` rows are); and for every sequence where a
reward model reads its score (`reward_row`, `reward_position`: the same token as in its own row).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from llm_stages.data.render import IGNORE_INDEX

log = logging.getLogger(__name__)

SHARE_PROMPT_SETTINGS = ("auto", "true", "false")


def shared_prefix_length(pair) -> int:
    """How many leading tokens the two sequences share and neither trains: the common prefix of
    their token ids, up to the first labelled token of either (a tokenizer merging across the
    prompt/reply boundary only shortens it)."""
    c, r = pair.chosen, pair.rejected
    limit = min(_first_label(c.labels), _first_label(r.labels))
    n = 0
    while n < limit and c.input_ids[n] == r.input_ids[n]:
        n += 1
    return n


def _first_label(labels) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def shared_length(pair) -> int:
    """Tokens of the pair's shared row: prompt once, then both replies."""
    return len(pair.chosen.input_ids) + len(pair.rejected.input_ids) - shared_prefix_length(pair)


def unshared_length(pair) -> int:
    return len(pair.chosen.input_ids) + len(pair.rejected.input_ids)


def prompt_saving(pairs) -> float:
    """The fraction of real tokens that sharing the prompt saves over forwarding both sequences."""
    unshared = sum(unshared_length(p) for p in pairs)
    return 1 - sum(shared_length(p) for p in pairs) / max(unshared, 1)


def decide_share_prompt(setting, pairs, min_saving: float) -> tuple[bool, str]:
    """Whether to share prompts, and why. `auto`: when the prompt tokens saved are at least
    `min_saving` of all real tokens of the unshared rows (a prompt of a tenth of each sequence saves
    ~10%; the 4-D mask costs the attention kernel's causal fast path, so small savings are not
    worth it)."""
    setting = str(setting).lower()
    saving = prompt_saving(pairs)
    if setting == "true":
        return True, f"datamodule.share_prompt=true (saves {saving:.0%} of the tokens)"
    if setting == "false":
        return False, "datamodule.share_prompt=false"
    on = saving >= min_saving
    return on, (f"datamodule.share_prompt=auto: the shared prompts save {saving:.0%} of the tokens, "
                f"{'>=' if on else '<'} datamodule.share_prompt_min_saving={min_saving:g}")


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions of `lengths` in rows of at most `capacity` tokens, first-fit decreasing (an item
    longer than `capacity` gets a row of its own). Rows in order of their first item; items in
    order of position within a row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((k for k, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    rows = [sorted(row) for row in rows]
    return sorted(rows, key=lambda row: row[0])


class SharedPairBatch(NamedTuple):
    input_ids: torch.Tensor  # (rows, seq)
    attention_mask: torch.Tensor  # (rows, 1, seq, seq) bool, True = may attend
    position_ids: torch.Tensor  # (rows, seq): rejected positions restart after the prompt
    labels: torch.Tensor  # (rows, seq) reply tokens only
    predictor: torch.Tensor  # (rows, seq) the position whose logits predict this token; -1: none
    sequence: torch.Tensor  # (rows, seq) the sequence a labelled token belongs to: pair i -> i, its rejected -> pairs + i; -1
    reward_row: torch.Tensor  # (2 * pairs,) where a reward model reads each sequence's score: row ...
    reward_position: torch.Tensor  # (2 * pairs,) ... and position
    real_tokens: torch.Tensor  # (rows, seq) 1 = not padding
    index: torch.Tensor  # (pairs,) position of each pair in its split
    margin: torch.Tensor  # (pairs,)
    unshared_tokens: int  # real tokens of the same pairs as two rows each (what the rates count)

    @property
    def num_pairs(self) -> int:
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real tokens as the unshared rows hold them, so tokens/s compares with unshared runs; the
        tokens actually forwarded are `real_tokens.sum()`."""
        return self.unshared_tokens

    @property
    def reply_lengths(self) -> torch.Tensor:
        """Trained tokens per sequence (2 * pairs,), as `(labels != -100).sum(-1)` of a PairBatch."""
        counted = self.sequence[self.labels != IGNORE_INDEX]
        return torch.bincount(counted[counted >= 0], minlength=2 * self.num_pairs)


def _last_non_pad(ids: list[int], pad_id: int) -> int:
    """Where HF sequence classifiers read a row's score: the rightmost token that is not padding (0 if none)."""
    return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad_id), 0)


def collate_shared_pairs(pairs, pad_id: int, pack: bool = True) -> SharedPairBatch:
    """Pairs -> rows of `[prompt, chosen, rejected]` blocks (several per row with `pack`)."""
    n = len(pairs)
    prefixes = [shared_prefix_length(p) for p in pairs]
    lengths = [unshared_length(p) - s for p, s in zip(pairs, prefixes)]
    rows = pack_rows(lengths, max(lengths)) if pack else [[i] for i in range(n)]
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    predictor = torch.full(shape, -1, dtype=torch.long)
    sequence = torch.full(shape, -1, dtype=torch.long)
    real = torch.zeros(shape, dtype=torch.long)
    # Attention: same block (pair), causal, and rejected (part 2) never sees chosen (part 1).
    block = torch.arange(width).repeat(len(rows), 1) + width  # padding: a block of its own per position
    part = torch.zeros(shape, dtype=torch.long)
    reward_row, reward_position = torch.zeros(2 * n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            p, s = pairs[i], prefixes[i]
            chosen, rejected = p.chosen, p.rejected
            c, k = len(chosen.input_ids) - s, len(rejected.input_ids) - s
            end = offset + s + c + k
            input_ids[r, offset:end] = torch.tensor(list(chosen.input_ids) + list(rejected.input_ids[s:]))
            labels[r, offset:end] = torch.tensor([IGNORE_INDEX] * s + list(chosen.labels[s:]) + list(rejected.labels[s:]))
            position_ids[r, offset:offset + s + c] = torch.arange(s + c)
            position_ids[r, offset + s + c:end] = torch.arange(s, s + k)
            predictor[r, offset + 1:end] = torch.arange(offset, end - 1)
            predictor[r, offset + s + c] = offset + s - 1 if s else -1  # the first rejected token: from the prompt's last
            sequence[r, offset + s:offset + s + c] = i
            sequence[r, offset + s + c:end] = n + i
            block[r, offset:end] = i
            part[r, offset + s:offset + s + c] = 1
            part[r, offset + s + c:end] = 2
            real[r, offset:end] = 1
            for seq, example, start in ((i, chosen, offset), (n + i, rejected, offset + c)):
                j = _last_non_pad(example.input_ids, pad_id)  # the token its own row's score is read at
                reward_row[seq], reward_position[seq] = r, (offset + j if j < s else start + j)
            offset = end
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (block[:, :, None] == block[:, None, :]) & causal & ~((part[:, :, None] == 2) & (part[:, None, :] == 1))
    return SharedPairBatch(input_ids, mask[:, None], position_ids, labels, predictor, sequence, reward_row,
                           reward_position, real, index=torch.tensor([p.index for p in pairs], dtype=torch.long),
                           margin=torch.tensor([p.margin for p in pairs], dtype=torch.float32),
                           unshared_tokens=sum(unshared_length(p) for p in pairs))
