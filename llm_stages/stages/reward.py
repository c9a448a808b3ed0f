"""RewardPairwise: a scalar-head reward model trained on preference pairs (Bradley-Terry).

The model is `AutoModelForSequenceClassification` with one label, so the export loads as a
standard HF reward model; the reward is read at the last non-padding token. Chosen and rejected
sequences go through the model in one forward pass. Validation ends with a report on
calibration and length bias.
"""

from __future__ import annotations

import logging

import torch

from llm_stages.data.kinds.pair import PairBatch
from llm_stages.data.kinds.shared_pair import SharedPairBatch
from llm_stages.losses.reward import pairwise_reward_loss
from llm_stages.models import reward_scores
from llm_stages.stages import pair_scoring
from llm_stages.stages.base import Stage

log = logging.getLogger(__name__)


class RewardPairwise(Stage):
    def __init__(self, model, tokenizer, optim, *, margin: float = 0.0, center_rewards_coefficient: float = 0.0,
                 calibration_bins: int = 10):
        """`margin` is added to every pair's own `margin` field (from the data, 0 when absent)."""
        super().__init__(model, tokenizer, optim)
        self.margin, self.center_rewards_coefficient = margin, center_rewards_coefficient
        self.calibration_bins = calibration_bins

    def setup(self, stage: str) -> None:
        pair_scoring.check_shared_prompts(self, reward_head=True)

    def rewards(self, batch: PairBatch | SharedPairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's (chosen, rejected) rewards, the prompt forwarded per sequence or once per pair."""
        if isinstance(batch, SharedPairBatch):
            scores = pair_scoring.shared_reward_scores(self.model, batch)
        else:
            scores = reward_scores(self.model, batch.input_ids, batch.attention_mask)
        return scores[:batch.num_pairs], scores[batch.num_pairs:]

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, data_margin: torch.Tensor):
        losses = pairwise_reward_loss(chosen, rejected, margin=self.margin + data_margin,
                                      center_rewards_coefficient=self.center_rewards_coefficient)
        stats = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum(),
                 "reward_chosen": chosen.sum(), "reward_rejected": rejected.sum()}
        return losses.sum(), stats

    def loss_sum(self, batch: PairBatch | SharedPairBatch):
        return self.pair_loss(*self.rewards(batch), batch.margin)

    def loss_weight(self, batch: PairBatch | SharedPairBatch) -> torch.Tensor:
        return torch.tensor(batch.num_pairs, device=self.device)

    # -- validation report ---------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._report_rows: list[torch.Tensor] = []

    def validation_step(self, batch: PairBatch | SharedPairBatch, batch_idx: int) -> None:
        chosen, rejected = self.rewards(batch)
        self._accumulate_val(*self.pair_loss(chosen, rejected, batch.margin), batch.num_pairs)
        lengths = pair_scoring.reply_lengths(batch).float()
        self._report_rows.append(torch.stack([chosen, rejected, lengths[:batch.num_pairs], lengths[batch.num_pairs:]], 1))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._report_rows:
            return
        rows = self._gather_rows(torch.cat(self._report_rows))
        report = reward_report(*rows.unbind(1), bins=self.calibration_bins)
        self.log_dict({f"val/{k}": v for k, v in report.items()}, sync_dist=True)
        if self.trainer.is_global_zero:
            log.info("reward model report: " + ", ".join(f"{k}={v:.4f}" for k, v in report.items()))


def reward_report(chosen: torch.Tensor, rejected: torch.Tensor, chosen_len: torch.Tensor, rejected_len: torch.Tensor,
                  bins: int = 10) -> dict[str, float]:
    """Calibration and length bias of a pairwise reward model on held-out pairs.

    - calibration_ece: expected calibration error of p = sigmoid(r_c - r_r) as the probability that
      the chosen reply wins, binned by confidence max(p, 1 - p) against the accuracy in each bin.
    - length_bias/accuracy_chosen_longer, .../accuracy_chosen_shorter: accuracy on the pairs where
      the chosen reply has more (fewer) tokens than the rejected; a large gap means the model
      rewards length rather than quality. NaN when no pair falls on that side.
    - length_bias/reward_length_corr: Pearson correlation of reward with reply length, all replies.
    """
    p = torch.sigmoid(chosen - rejected)
    correct = (p > 0.5).float()
    confidence = torch.maximum(p, 1 - p)
    bin_of = ((confidence - 0.5) * 2 * bins).long().clamp(max=bins - 1)
    ece = torch.zeros(())
    for b in range(bins):
        in_bin = bin_of == b
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    longer, shorter = chosen_len > rejected_len, chosen_len < rejected_len
    nan = float("nan")
    rewards, lengths = torch.cat([chosen, rejected]), torch.cat([chosen_len, rejected_len])
    corr = torch.corrcoef(torch.stack([rewards, lengths]))[0, 1] if lengths.std() > 0 else torch.tensor(nan)
    return {
        "calibration_ece": ece.item(),
        "length_bias/accuracy_chosen_longer": correct[longer].mean().item() if longer.any() else nan,
        "length_bias/accuracy_chosen_shorter": correct[shorter].mean().item() if shorter.any() else nan,
        "length_bias/reward_length_corr": corr.item(),
    }
