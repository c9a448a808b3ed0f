"""CausalLM: pretraining (packed blocks) and supervised fine-tuning (assistant tokens only).

Both are the same objective, next-token cross-entropy averaged over trained tokens; they differ
only in the data pipeline (PTDataModule / SFTDataModule), which decides what is labelled.
"""

from __future__ import annotations

import math

import torch

from llm_stages.data.collate import CausalBatch
from llm_stages.losses import token_cross_entropy
from llm_stages.stages.base import Stage


class CausalLM(Stage):
    def forward(self, batch: CausalBatch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    def loss_sum(self, batch: CausalBatch):
        loss_sum, _ = token_cross_entropy(self(batch), batch.labels)
        return loss_sum, {}

    def loss_weight(self, batch: CausalBatch) -> torch.Tensor:
        return (batch.labels[:, 1:] != -100).sum()

    # Validation loss is token-weighted over the whole validation set, not a mean of batch means.
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device)
        self._val_tokens = torch.zeros((), device=self.device)

    def validation_step(self, batch: CausalBatch, batch_idx: int) -> None:
        loss_sum, n_tokens = token_cross_entropy(self(batch), batch.labels)
        self._val_sum += loss_sum
        self._val_tokens += n_tokens

    def on_validation_epoch_end(self) -> None:
        loss = (self._all_reduce(self._val_sum) / self._all_reduce(self._val_tokens).clamp(min=1)).item()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", math.exp(min(loss, 50.0)))
