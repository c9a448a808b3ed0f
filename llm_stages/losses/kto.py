"""KTO on unpaired feedback ("KTO: Model Alignment as Prospect Theoretic Optimization", Ethayarajh
et al. 2024) as small pure functions, following TRL 1.16's `KTOTrainer._compute_loss`.

Each reply is judged on its own: desirable (label True) or undesirable. Its reward is the policy /
reference log-ratio of the reply, and the value it is compared with is a reference point z0: the
KL between policy and reference, estimated from mismatched (prompt, reply) pairs — each prompt with
another example's reply — and detached, clamped at 0 (`kl_reference_point`):

    desirable:    desirable_weight   * (1 - sigmoid(beta * (logratio - z0)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z0 - logratio)))

`UNPAIRED_LOSSES` holds the per-label functions by TRL's `loss_type` name: `kto` and
`apo_zero_unpaired` (APO-zero's unpaired form, no reference point). `kto_loss` dispatches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from llm_stages.ranges import POSITIVE, Range

log = logging.getLogger(__name__)

# The allowed range of each KTO setting (`module.<name>`), checked with the config: beta 0 carries no
# signal and a weight <= 0 ignores, or reverses, a label.
KTO_RANGES = {"beta": POSITIVE, "desirable_weight": POSITIVE, "undesirable_weight": POSITIVE,
              "rpo_alpha": Range(0, nullable=True, note="null: no NLL term")}

# loss_type -> fn(desirable logratios, undesirable logratios, z0, beta) -> (their unweighted losses)
UNPAIRED_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]] = {}


def _register(name: str):
    def decorator(fn):
        UNPAIRED_LOSSES[name] = fn
        return fn
    return decorator


@_register("kto")
def kto(chosen_logratios: Tensor, rejected_logratios: Tensor, kl: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Eq. 7 of the KTO paper: each reward measured against the reference point `kl`."""
    return 1 - torch.sigmoid(beta * (chosen_logratios - kl)), 1 - torch.sigmoid(beta * (kl - rejected_logratios))


@_register("apo_zero_unpaired")
def apo_zero_unpaired(chosen_logratios: Tensor, rejected_logratios: Tensor, kl: Tensor,
                      beta: float) -> tuple[Tensor, Tensor]:
    """APO-zero, unpaired ("Anchored Preference Optimization", Eq. 7): desirable replies pushed up,
    undesirable down, each against zero (no reference point; `kl` is unused)."""
    return 1 - torch.sigmoid(beta * chosen_logratios), torch.sigmoid(beta * rejected_logratios)


class KTOLoss(NamedTuple):
    losses: Tensor  # (batch,) weighted per-example losses, in the input order; TRL's loss is their mean
    rewards: Tensor  # (batch,) beta * (policy - reference) log-ratio, detached


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor | float, *,
             loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> KTOLoss:
    """Per-example KTO losses of (batch,) summed reply log-probs under the policy and the reference,
    `labels` (batch,) bool (True: desirable) and the reference point `kl` (a scalar: see
    `kl_reference_point`). Computed in float32. Defaults are TRL 1.16's KTOConfig."""
    try:
        per_label = UNPAIRED_LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; known types: {sorted(UNPAIRED_LOSSES)}") from None
    logratios = policy_logps.float() - ref_logps.float()
    kl = torch.as_tensor(kl, dtype=torch.float32, device=logratios.device)
    labels = labels.bool()
    chosen_losses, rejected_losses = per_label(logratios, logratios, kl, beta)
    losses = torch.where(labels, desirable_weight * chosen_losses, undesirable_weight * rejected_losses)
    return KTOLoss(losses, beta * logratios.detach())


def kl_reference_point(kl_logps: Tensor, ref_kl_logps: Tensor,
                       mean_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """KTO's reference point z0 as TRL 1.16 estimates it: the batch mean of policy - reference
    log-probs of the mismatched (prompt, reply) pairs, detached (no gradient flows through z0),
    averaged over devices (a plain mean of the ranks' means) and only then clamped at 0."""
    kl = (kl_logps.float() - ref_kl_logps.float()).mean().detach()
    if mean_over_ranks is not None:
        kl = mean_over_ranks(kl)
    return kl.clamp(min=0)


def weight_advice(num_desirable: int, num_undesirable: int, desirable_weight: float,
                  undesirable_weight: float) -> str | None:
    """TRL 1.16's check of class imbalance (Eq. 8 of the KTO paper): with unequal counts,
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) should lie in [1, 4/3].
    Returns the advice (the ranges, rounded as TRL rounds them) when neither weight is in its range."""
    num_desirable, num_undesirable = max(num_desirable, 1), max(num_undesirable, 1)
    if num_desirable == num_undesirable:
        return None
    des_low = round(num_undesirable * undesirable_weight / num_desirable, 2)
    des_high = round(num_undesirable * undesirable_weight / num_desirable * 1.33, 2)
    und_low = round(num_desirable * desirable_weight / num_undesirable / 1.33, 2)
    und_high = round(num_desirable * desirable_weight / num_undesirable, 2)
    if des_low <= desirable_weight <= des_high or und_low <= undesirable_weight <= und_high:
        return None
    return (f"{num_desirable} desirable and {num_undesirable} undesirable examples with desirable_weight="
            f"{desirable_weight}, undesirable_weight={undesirable_weight}: desirable_weight * {num_desirable} / "
            f"(undesirable_weight * {num_undesirable}) should lie in [1, 4/3] (KTO paper, Eq. 8); set EITHER "
            f"module.desirable_weight in [{des_low}, {des_high}] OR module.undesirable_weight in "
            f"[{und_low}, {und_high}] (not both)")


__all__ = ["KTO_RANGES", "UNPAIRED_LOSSES", "KTOLoss", "kl_reference_point", "kto_loss", "weight_advice"]
