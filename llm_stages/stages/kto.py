"""KTO: a policy trained on unpaired feedback — replies labelled desirable or undesirable — against a
frozen reference, as TRL 1.16's KTOTrainer does.

Each micro-batch holds its examples' completion rows and their KL rows (each prompt with another
example's reply: llm_stages.data.kinds.unpaired); the KL rows are scored without a graph. The reference point
z0 is the mean policy - reference log-ratio of the KL rows, detached, averaged over devices and
clamped at 0 (llm_stages.losses.kto.kl_reference_point); the loss is
`llm_stages.losses.kto.kto_loss` (`module.loss_type`: kto | apo_zero_unpaired, `beta`,
`desirable_weight`, `undesirable_weight`, TRL's names and defaults), a mean over examples;
`module.rpo_alpha` adds rpo_alpha x the per-token NLL of each desirable reply (the RPO term the DPO
stage adds to the chosen replies; not in TRL's KTOTrainer), which keeps the desirable replies likely
while the undesirable ones are pushed down.
Reference log-probs of both rows come from `module.ref=precompute|copy` (llm_stages.stages.reference,
shared with DPO). Metrics carry TRL's names: `rewards/chosen` and `logps/chosen` (means over the
desirable examples), `rewards/rejected`, `logps/rejected` (over the undesirable ones),
`rewards/margins` (their difference), `kl`, `logits/chosen`, `logits/rejected`; plus
`desirable_fraction` and `rewards/label_accuracy` (the fraction of examples whose reward has the
sign its label asks for).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from llm_stages.adapters import frozen_reference
from llm_stages.data.kinds.unpaired import UnpairedBatch
from llm_stages.errors import ConfigError
from llm_stages.losses.causal import labelled_outputs, sequence_logps
from llm_stages.losses.kto import KTO_RANGES, UNPAIRED_LOSSES, kl_reference_point, kto_loss, weight_advice
from llm_stages.losses.preference import add_nll
from llm_stages.ranges import check_ranges
from llm_stages.stages.base import Stage
from llm_stages.stages.reference import ReferenceLogps

log = logging.getLogger(__name__)

# Stats summed over all examples but meant per label: (stat, label it averages over).
PER_LABEL = {"rewards/chosen": True, "logps/chosen": True, "logits/chosen": True,
             "rewards/rejected": False, "logps/rejected": False, "logits/rejected": False}


class KTO(Stage):
    def __init__(self, model, tokenizer, optim, *, loss_type: str = "kto", beta: float = 0.1,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, ref: str = "precompute",
                 rpo_alpha: float | None = None):
        super().__init__(model, tokenizer, optim)
        if loss_type not in UNPAIRED_LOSSES:
            raise ConfigError(f"module.loss_type={loss_type}: expected one of {', '.join(UNPAIRED_LOSSES)}")
        check_ranges(dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                          rpo_alpha=rpo_alpha), KTO_RANGES, "module")
        self.rpo_alpha = rpo_alpha
        self.loss_params = dict(loss_type=loss_type, beta=float(beta), desirable_weight=float(desirable_weight),
                                undesirable_weight=float(undesirable_weight))
        # apo_zero_unpaired has no reference point: no KL rows need scoring (TRL: calculate_KL=False).
        self.uses_kl = loss_type == "kto"
        self.reference_scores = ReferenceLogps(ref)  # (stage, batch) -> reference logps of completion, KL rows
        self.reference = frozen_reference(model) if ref == "copy" else None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        labels = [e.label for e in self.trainer.datamodule.train_set]
        advice = weight_advice(sum(labels), len(labels) - sum(labels), self.loss_params["desirable_weight"],
                               self.loss_params["undesirable_weight"])
        if advice:  # TRL warns the same way (KTOTrainer._prepare_dataset)
            log.warning("KTO class balance: %s", advice)

    # -- scoring ---------------------------------------------------------------------------------
    @staticmethod
    def score(model, batch: UnpairedBatch):
        """(summed reply log-probs, reply token counts, mean reply logits), one per row of `batch`
        (all its rows: completion rows, then KL rows; or `batch.completion_rows()`, ...)."""
        outputs, labels = labelled_outputs(model, batch.labels, input_ids=batch.input_ids,
                                          attention_mask=batch.attention_mask)
        return sequence_logps(outputs, labels)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        self.reference_scores.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference_scores.load(checkpoint, self.trainer.datamodule)

    # -- loss ------------------------------------------------------------------------------------
    def loss_sum(self, batch: UnpairedBatch):
        n, desirable = batch.num_examples, batch.label
        policy, n_tokens, mean_logits = self.score(self.model, batch.completion_rows())
        reference, reference_kl = self.reference_scores(self, batch)
        if self.uses_kl:  # z0 carries no gradient: its rows are scored without a graph, as in TRL
            with torch.no_grad():
                policy_kl = self.score(self.model, batch.kl_rows())[0]
            # per micro-batch, then a plain mean over ranks, as TRL's per-device batches
            kl = kl_reference_point(policy_kl, reference_kl, self._mean_over_ranks)
        else:
            kl = torch.zeros((), device=self.device)
        losses, rewards = kto_loss(policy, reference, desirable, kl, **self.loss_params)
        if self.rpo_alpha:  # the desirable replies' per-token NLL; none for the undesirable ones
            losses = add_nll(losses, torch.where(desirable, -policy / n_tokens.clamp(min=1), 0.0), self.rpo_alpha)
        undesirable = ~desirable
        stats = {  # summed over examples; the base divides by the example count, `per_label` by each label's
            "kl": kl * n, "desirable_fraction": desirable.float().sum(),
            "rewards/chosen": rewards[desirable].sum(), "rewards/rejected": rewards[undesirable].sum(),
            "logps/chosen": policy[desirable].detach().sum(), "logps/rejected": policy[undesirable].detach().sum(),
            "logits/chosen": mean_logits[desirable].detach().sum(),
            "logits/rejected": mean_logits[undesirable].detach().sum(),
            "rewards/label_accuracy": torch.where(desirable, rewards > 0, rewards < 0).float().sum(),
        }
        return losses.sum(), stats

    def loss_weight(self, batch: UnpairedBatch) -> torch.Tensor:
        return torch.tensor(batch.num_examples, device=self.device)

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return value
        return self._all_reduce(value) / self.trainer.world_size

    # -- metrics ---------------------------------------------------------------------------------
    def derived_train_metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return per_label(stats)

    def derived_val_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {f"val/{k}": v for k, v in per_label({k[4:]: v for k, v in metrics.items()}).items()}


def per_label(stats: dict) -> dict:
    """Means over each label's examples from means over all examples (dividing by the label's
    fraction), and `rewards/margins` = chosen - rejected, as TRL reports them. A label absent from
    the batch keeps 0 (TRL leaves the metric out) and no margin is given."""
    desirable = stats["desirable_fraction"]
    fraction = {True: desirable, False: 1 - desirable}
    out = {k: stats[k] / fraction[label] for k, label in PER_LABEL.items() if fraction[label] > 0}
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
