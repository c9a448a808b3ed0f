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


def causal_attention_mask(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None):
    """The attention mask a causal LM needs for right-padded rows: none. Padding after a row's last token
    is never attended by that row's tokens (they attend only to earlier positions), so causal attention
    alone gives every real token the same output, and the pad positions are not trained (labels -100).
    Without a mask the attention kernels skip the masked-out half of each row's scores instead of
    computing and then masking them (about half the attention time at 2k tokens). A mask with padding
    elsewhere, or rows given their own positions (packing), is kept."""
    if attention_mask is None or position_ids is not None or attention_mask.dim() != 2:
        return attention_mask
    lengths = attention_mask.sum(-1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    right_padded = bool(torch.equal(attention_mask.bool(), positions < lengths))
    return None if right_padded else attention_mask


class CausalLM(Stage):
    def forward(self, batch: CausalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's outputs over the labelled part of the batch (llm_stages.losses.causal), and its labels."""
        return labelled_outputs(self.model, batch.labels, input_ids=batch.input_ids,
                               attention_mask=causal_attention_mask(batch.attention_mask, batch.position_ids),
                               position_ids=batch.position_ids)

    def loss_sum(self, batch: CausalBatch):
        loss_sum, _ = token_cross_entropy(*self(batch))
        return loss_sum, {}

    def loss_weight(self, batch: CausalBatch) -> torch.Tensor:
        return (batch.labels[:, 1:] != -100).sum()

    def derived_val_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"val/ppl": math.exp(min(metrics["val/loss"], 50.0))}
