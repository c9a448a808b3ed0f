"""DPO: a policy trained on preference pairs against a frozen reference.

Chosen and rejected sequences run through the policy in one concatenated forward pass; each
sequence is scored by the summed log-probabilities of its reply tokens. The loss is the config
group `loss=<name>` (conf/loss/, default sigmoid: DPO with beta 0.1), checked against the
parameters its function in llm_stages.losses.preference declares; `module.rpo_alpha` adds
rpo_alpha * NLL(chosen) to any of them (RPO).

Reference log-probs come from `ref=precompute` (default: the initial policy scores every pair
once, cached and checkpointed; no second model held) or `ref=copy` (a frozen copy, or the policy
with its adapter off), as llm_stages.stages.reference says. Reference-free losses (`simpo`,
`orpo`) use neither.
"""

from __future__ import annotations

import torch

from llm_stages.adapters import frozen_reference
from llm_stages.data.kinds.pair import PairBatch
from llm_stages.data.kinds.shared_pair import SharedPairBatch
from llm_stages.losses import dpo_loss, loss_settings, orpo_loss, simpo_loss
from llm_stages.losses.preference import REFERENCE_FREE_LOSSES, add_nll
from llm_stages.stages.base import Stage
from llm_stages.stages.pair_scoring import check_shared_prompts, sequence_scores
from llm_stages.stages.reference import ReferenceLogps


class DPO(Stage):
    def __init__(self, model, tokenizer, optim, *, loss: dict, rpo_alpha: float | None = None,
                 ref: str = "precompute"):
        super().__init__(model, tokenizer, optim)
        self.loss_type, self.loss_params = loss_settings(loss)
        self.rpo_alpha = rpo_alpha
        self.reference_scores = ReferenceLogps(ref)  # (stage, batch) -> reference logps of chosen, rejected
        self.ref_mode = None if self.loss_type in REFERENCE_FREE_LOSSES else ref
        self.reference = frozen_reference(model) if self.ref_mode == "copy" else None

    def setup(self, stage: str) -> None:
        check_shared_prompts(self, reward_head=False)

    # -- scoring ---------------------------------------------------------------------------------
    @staticmethod
    def score(model, batch: PairBatch | SharedPairBatch):
        """(summed reply log-probs, reply token counts, mean reply logits), each (2 * pairs,), in
        either layout (prompt forwarded per sequence or once per pair: llm_stages.stages.pair_scoring)."""
        return sequence_scores(model, batch)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        self.reference_scores.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference_scores.load(checkpoint, self.trainer.datamodule)

    # -- loss ------------------------------------------------------------------------------------
    def loss_sum(self, batch: PairBatch | SharedPairBatch):
        n = batch.num_pairs
        logps, n_tokens, mean_logits = self.score(self.model, batch)
        chosen, rejected = logps[:n], logps[n:]
        # Reference-free losses score replies by their per-token average log-prob.
        chosen_avg, rejected_avg = (logps / n_tokens.clamp(min=1)).split(n)
        chosen_nll = -chosen_avg  # per-token NLL of the chosen reply (ORPO, RPO)
        if self.loss_type == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_avg, rejected_avg, **self.loss_params)
        elif self.loss_type == "orpo":
            losses, chosen_rewards, rejected_rewards = orpo_loss(chosen_avg, rejected_avg, chosen_nll,
                                                                 **self.loss_params)
        else:
            ref_chosen, ref_rejected = self.reference_scores(self, batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, loss_type=self.loss_type,
                chosen_lengths=n_tokens[:n], rejected_lengths=n_tokens[n:], **self.loss_params)
        if self.rpo_alpha:
            losses = add_nll(losses, chosen_nll, self.rpo_alpha)
        stats = {  # summed over pairs; the base divides by the pair count. Names as TRL's.
            "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
            "logits/chosen": mean_logits[:n].detach().sum(), "logits/rejected": mean_logits[n:].detach().sum(),
        }
        return losses.sum(), stats

    def loss_weight(self, batch: PairBatch | SharedPairBatch) -> torch.Tensor:
        return torch.tensor(batch.num_pairs, device=self.device)
