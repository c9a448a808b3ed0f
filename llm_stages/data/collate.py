"""Examples -> padded tensors, as every kind shares it: causal rows right-padded with labels -100
(each kind's own batch type and collate function are in `llm_stages/data/kinds/`), micro-batches of
one optimiser step, length grouping, and the resumable sampler and loader."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Sampler

from llm_stages.data.render import IGNORE_INDEX, Example


class CausalBatch(NamedTuple):
    input_ids: torch.Tensor  # (batch, seq) long
    attention_mask: torch.Tensor  # (batch, seq) long, 1 = real token; packed rows: (batch, 1, seq, seq) bool
    labels: torch.Tensor  # (batch, seq) long, -100 = not trained
    position_ids: torch.Tensor | None = None  # packed rows restart positions at each example
    real_tokens: torch.Tensor | None = None  # packed rows: the 2-D padding mask the 4-D one replaces

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int((self.real_tokens if self.real_tokens is not None else self.attention_mask).sum())


def collate_causal(examples: list[Example], pad_id: int) -> CausalBatch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return CausalBatch(input_ids, attention_mask, labels)


def length_groups(lengths: list[int], max_groups: int, group_cost: int) -> list[list[int]]:
    """The positions of `lengths` in at most `max_groups` groups of similar length, chosen to
    minimise the tokens the groups' forward passes compute: each group is padded to its own
    longest, plus `group_cost` tokens per group for what one more pass costs. Longest group first;
    positions ascending within a group."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n, inf = len(order), float("inf")
    # best[g][j]: the cheapest split of the j longest into g groups; a group order[i:j] costs (j - i) * its longest
    best = [[0.0] + [inf] * n] + [[inf] * (n + 1) for _ in range(max_groups)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                cost = best[g - 1][i] + (j - i) * lengths[order[i]] + group_cost
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    groups, j = min(range(1, max_groups + 1), key=lambda g: (best[g][n], g)), n
    bounds = []
    for g in range(groups, 0, -1):
        bounds.append((cut[g][j], j))
        j = cut[g][j]
    return [sorted(order[i:j]) for i, j in reversed(bounds)]


class MicroBatches:
    """Collates one optimiser step's examples into `grad_accum` micro-batches, each padded to its
    own longest sequence (so accumulation never costs extra padding).

    With `max_groups` > 1 each micro-batch is further split by length (`length_groups`), so short
    sequences are not padded to the longest of the batch: the same examples and the same loss
    (the stages weigh every micro-batch exactly), fewer padded positions through the model."""

    def __init__(self, collate_one, micro_batch_size: int, *, length=None, max_groups: int = 1, group_cost: int = 64):
        self.collate_one, self.micro_batch_size = collate_one, micro_batch_size
        self.length, self.max_groups, self.group_cost = length, max_groups, group_cost

    def __call__(self, examples: list) -> list:
        size = self.micro_batch_size
        chunks = [examples[i:i + size] for i in range(0, len(examples), size)]
        if self.max_groups > 1:
            chunks = [[chunk[i] for i in group] for chunk in chunks
                      for group in length_groups([self.length(e) for e in chunk], self.max_groups, self.group_cost)]
        return [self.collate_one(chunk) for chunk in chunks]


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled batches of indices, a fresh permutation per epoch from (seed, epoch), sharded over
    ranks. The training loop reports each consumed batch (`consumed`); that count is saved in
    Lightning checkpoints through `ResumableDataLoader`, so a resumed run continues with exactly
    the batch it would have seen next (counting yields instead would be off by the prefetch).

    Sharding is per step, not per epoch: the permutation is cut into global batches of
    `batch_size x world_size` indices and rank r takes the r-th slice of each. So a step's global
    batch is the same set of examples whatever the world size: 2 ranks x 4 train on exactly what
    1 process x 8 does (contiguous per-rank shards of the epoch would not)."""

    GROUP_WINDOW = 50  # batches whose examples are sorted together when grouping by length

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, lengths: list[int] | None = None):
        """With `lengths`, examples of similar length are batched together (less padding): the
        shuffled order is sorted by length within windows of GROUP_WINDOW batches, and the
        resulting batches are shuffled again, so batch order stays random."""
        self.num_examples, self.batch_size, self.lengths = num_examples, batch_size, lengths
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.consumed = 0  # batches consumed since the start of training, all epochs
        self._next_epoch, self._skip = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of one epoch."""
        if self.shuffle:
            order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.num_examples))
        global_size = self.batch_size * self.world_size
        if self.lengths is not None:
            window = global_size * self.GROUP_WINDOW
            order = [i for w in range(0, len(order), window)
                     for i in sorted(order[w:w + window], key=lambda i: -self.lengths[i])]
        global_batches = [order[i:i + global_size] for i in range(0, len(order), global_size)]
        if self.drop_last and global_batches and len(global_batches[-1]) < global_size:
            global_batches.pop()
        if self.lengths is not None and self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch + 1)
            global_batches = [global_batches[i] for i in torch.randperm(len(global_batches), generator=generator).tolist()]
        # Equal slices (a short last batch without drop_last is split evenly, its remainder
        # dropped), so every rank takes the same number of steps.
        batches = []
        for batch in global_batches:
            per_rank = len(batch) // self.world_size
            if per_rank:
                batches.append(batch[self.rank * per_rank:(self.rank + 1) * per_rank])
        return batches

    def __iter__(self):
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        skip, self._skip = self._skip, 0
        yield from self.batches(epoch)[skip:]

    def __len__(self) -> int:
        return len(self.batches(0))

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]
        self._next_epoch, self._skip = divmod(self.consumed, len(self))


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning saves and restores (it checks for state_dict/load_state_dict)."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)
