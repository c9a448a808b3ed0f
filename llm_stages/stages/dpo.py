"""DPO: a policy trained on preference pairs against a frozen reference.

Chosen and rejected sequences run through the policy in one concatenated forward pass; each
sequence is scored by the summed log-probabilities of its reply tokens. The loss is the config
group `loss=<name>` (conf/loss/, default sigmoid: DPO with beta 0.1), checked against the
parameters its function in llm_stages.losses.preference declares; `module.rpo_alpha` adds
rpo_alpha * NLL(chosen) to any of them (RPO).

Reference log-probs come from
- `ref=precompute` (default): one pass of the initial policy over the train and validation pairs
  before the first update, cached per pair (and saved in checkpoints with a fingerprint of the
  pairs' tokens, so a resume on changed data or tokenization is refused rather than trained
  against another pair's log-probs). No second model is held during training; since the
  reference *is* the initial policy, nothing else needs loading.
- `ref=copy`: a frozen copy of the initial policy, run next to it at every step; under LoRA/QLoRA
  the policy with its adapter switched off, so no copy is held either.
Reference-free losses (`simpo`, `orpo`) use neither.
"""

from __future__ import annotations

import torch

from llm_stages.adapters import frozen_reference, reference_of
from llm_stages.data.kinds.pair import PairBatch
from llm_stages.data.kinds.shared_pair import SharedPairBatch
from llm_stages.errors import ConfigError
from llm_stages.losses import dpo_loss, loss_settings, orpo_loss, simpo_loss
from llm_stages.losses.preference import REFERENCE_FREE_LOSSES, add_nll
from llm_stages.stages.base import Stage
from llm_stages.stages.pair_scoring import check_shared_prompts, sequence_scores


class DPO(Stage):
    def __init__(self, model, tokenizer, optim, *, loss: dict, rpo_alpha: float | None = None,
                 ref: str = "precompute"):
        super().__init__(model, tokenizer, optim)
        self.loss_type, self.loss_params = loss_settings(loss)
        self.rpo_alpha = rpo_alpha
        if ref not in ("precompute", "copy"):
            raise ConfigError(f"module.ref must be 'precompute' or 'copy', got {ref!r}")
        self.ref_mode = None if self.loss_type in REFERENCE_FREE_LOSSES else ref
        self.reference = frozen_reference(model) if self.ref_mode == "copy" else None
        self.reference_logps: dict[str, torch.Tensor] = {}  # split -> (pairs, 2) for ref=precompute
        self.reference_fingerprint: str | None = None  # of the pairs they were computed on

    def setup(self, stage: str) -> None:
        check_shared_prompts(self, reward_head=False)

    # -- scoring ---------------------------------------------------------------------------------
    @staticmethod
    def score(model, batch: PairBatch | SharedPairBatch):
        """(summed reply log-probs, reply token counts, mean reply logits), each (2 * pairs,), in
        either layout (prompt forwarded per sequence or once per pair: llm_stages.stages.pair_scoring)."""
        return sequence_scores(model, batch)

    def reference_scores(self, batch: PairBatch | SharedPairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_mode == "copy":
            with torch.no_grad(), reference_of(self.model, self.reference) as reference:
                logps = self.score(reference, batch)[0]
            return logps[:batch.num_pairs], logps[batch.num_pairs:]
        if not self.reference_logps:
            self._precompute_reference()
        cached = self.reference_logps["train" if self.training else "val"][batch.index.cpu()].to(self.device)
        return cached[:, 0], cached[:, 1]

    @torch.no_grad()
    def _precompute_reference(self) -> None:
        """Score every pair once with the policy as it is now (before any update, it is the reference)."""
        datamodule, was_training = self.trainer.datamodule, self.model.training
        self.model.eval()
        for split in ("train", "val"):
            chunks = []
            for batch in datamodule.reference_batches(split):
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                logps = self.score(self.model, batch)[0]
                chunks.append(torch.stack([logps[:batch.num_pairs], logps[batch.num_pairs:]], 1).cpu())
            self.reference_logps[split] = torch.cat(chunks) if chunks else torch.zeros(0, 2)
        self.reference_fingerprint = datamodule.fingerprint()
        self.model.train(was_training)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["reference_logps"] = self.reference_logps  # a resumed run must not re-score with a trained policy
        checkpoint["reference_fingerprint"] = self.reference_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference_logps = checkpoint.get("reference_logps", {})
        self.reference_fingerprint = checkpoint.get("reference_fingerprint")
        if self.reference_logps and self.reference_fingerprint is not None:
            current = self.trainer.datamodule.fingerprint()
            if current != self.reference_fingerprint:
                raise ConfigError(f"the checkpoint's cached reference log-probs (module.ref=precompute) belong to other "
                                  f"data or tokenization (fingerprint {self.reference_fingerprint} != {current} now): "
                                  "resume with the data and tokenizer settings it was trained on, or start a new run")

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
            ref_chosen, ref_rejected = self.reference_scores(batch)
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
