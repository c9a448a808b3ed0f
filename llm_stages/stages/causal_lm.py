"""CausalLM: pretraining (packed blocks) and supervised fine-tuning (assistant tokens only).

Both are the same objective, next-token cross-entropy averaged over trained tokens; they differ
only in the data pipeline (PTDataModule / SFTDataModule), which decides what is labelled.
"""

from __future__ import annotations

import math

import torch

from llm_stages.data.collate import CausalBatch
from llm_stages.losses import token_cross_entropy
from llm_stages.losses.causal import labelled_outputs
from llm_stages.stages.base import Stage


class CausalLM(Stage):
    def forward(self, batch: CausalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's outputs over the labelled part of the batch (llm_stages.losses.causal), and its labels."""
        return labelled_outputs(self.model, batch.labels, input_ids=batch.input_ids,
                               attention_mask=batch.attention_mask, position_ids=batch.position_ids)

    def loss_sum(self, batch: CausalBatch):
        loss_sum, _ = token_cross_entropy(*self(batch))
        return loss_sum, {}

    def loss_weight(self, batch: CausalBatch) -> torch.Tensor:
        return (batch.labels[:, 1:] != -100).sum()

    def derived_val_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"val/ppl": math.exp(min(metrics["val/loss"], 50.0))}
