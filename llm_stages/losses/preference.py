"""Pairwise preference losses (DPO family, SimPO, ORPO) as small pure functions.

Every DPO-family loss is one function registered by name in `PREFERENCE_LOSSES`, with the
signature

    fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
       beta=0.1, <its own hyperparameters with their defaults>) -> losses

taking per-example (batch,) float32 sequence log-probabilities (summed over the completion unless
a docstring says otherwise) and returning per-example (batch,) losses. The keyword-only arguments
are the loss's declaration: `loss_parameters(name)` reads them (less the completion lengths
`chosen_lengths`/`rejected_lengths`, which are batch data, not settings), `loss_settings` checks
a `loss=` config against them, and an argument a loss does not declare is an error, not ignored.
Call them through `dpo_loss`, which casts to float32 first. The reference-free `simpo_loss` and
`orpo_loss` (`REFERENCE_FREE_LOSSES`) take other inputs and declare their parameters the same way.

The names, formulas and defaults follow TRL 1.16 (`DPOTrainer._compute_loss`,
`experimental.cpo.CPOTrainer.cpo_loss`, `experimental.orpo.ORPOTrainer.odds_ratio_loss`);
where they differ from TRL the docstring says so.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_stages.errors import ConfigError
from llm_stages.ranges import NON_NEGATIVE, POSITIVE, Range, check_ranges

PREFERENCE_LOSSES: dict[str, Callable[..., Tensor]] = {}
# The allowed range of each hyperparameter, by name; a loss that needs a narrower one declares it
# with `register(..., ranges=)` (LOSS_RANGES). A name without a range (bco_delta) takes any number.
PARAMETER_RANGES: dict[str, Range] = {
    "beta": POSITIVE,  # 0 carries no preference signal, a negative beta prefers the rejected replies
    "label_smoothing": Range(0, 0.5, high_open=True),  # the label-flip rate: at 0.5 the labels say nothing
    "gamma": NON_NEGATIVE,  # SimPO's target margin
    "discopop_tau": POSITIVE,  # the temperature of DiscoPOP's gate
}
LOSS_RANGES: dict[str, dict[str, Range]] = {}
# The DPO stage's own settings around its loss.
DPO_MODULE_RANGES = {"rpo_alpha": Range(0, nullable=True, note="null: no NLL term")}
# Batch data a length-normalised loss takes next to the log-probs: completion token counts.
LENGTH_INPUTS = ("chosen_lengths", "rejected_lengths")


def register(*names: str, ranges: dict[str, Range] | None = None) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator adding a loss to `PREFERENCE_LOSSES` under one or more names (aliases). Its
    keyword-only arguments and their defaults declare its hyperparameters (`loss_parameters`);
    a `loss=<name>` config needs conf/loss/<name>.yaml with the same keys. `ranges`: where a
    hyperparameter's allowed range differs from PARAMETER_RANGES'."""

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        for name in names:
            if name in PREFERENCE_LOSSES:
                raise ValueError(f"preference loss {name!r} is already registered")
            PREFERENCE_LOSSES[name] = fn
            LOSS_RANGES[name] = dict(ranges or {})
        return fn

    return decorator


def _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> tuple[Tensor, Tensor]:
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps


def _per_token(logratios: Tensor, lengths: Tensor | None) -> Tensor:
    # Summed log-ratios grow with completion length, so a fixed margin (IPO) or beta would mean
    # different things for short and long answers; TRL 1.16 divides by the completion token count.
    if lengths is None:
        return logratios
    return logratios / torch.as_tensor(lengths, device=logratios.device).float().clamp(min=1.0)


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    # The label is wrong with probability label_smoothing: expected NLL under the flipped label too.
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


@register("sigmoid")
def sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """DPO, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model";
    with label_smoothing > 0 it is cDPO ("A note on DPO with noisy preferences", Mitchell 2023).

    TRL 1.16 ignores label_smoothing here (it keeps it for robust/exo_pair/aot only); at the
    default 0.0 the two agree, above it this follows cDPO as in TRL < 1.0.
    """
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _smoothed_sigmoid(beta * (chosen - rejected), label_smoothing)


@register("sigmoid_norm")
def sigmoid_norm(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """Length-normalised DPO ("Tülu 3: Pushing Frontiers in Open Language Model Post-Training").

    Each log-ratio is divided by its completion token count (`chosen_lengths`/`rejected_lengths`,
    clamped to >= 1, as TRL 1.16); pass None if the logps are already per-token averages.
    """
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = _per_token(chosen, chosen_lengths) - _per_token(rejected, rejected_lengths)
    return -F.logsigmoid(beta * delta)


@register("robust")
def robust(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """Robust DPO ("Provably Robust DPO: Aligning Language Models with Noisy Feedback").

    label_smoothing is the label-flip rate and must lie in [0, 0.5): at 0.5 the unbiased estimator
    divides by zero. (TRL only warns; here it is an error.)
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen - rejected)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


@register("hinge")
def hinge(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1):
    """SLiC hinge loss ("SLiC-HF: Sequence Likelihood Calibration with Human Feedback"), on the
    DPO log-ratio margin with margin 1/beta."""
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1 - beta * (chosen - rejected))


@register("ipo")
def ipo(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """IPO, Eq. 17 of "A General Theoretical Paradigm to Understand Learning from Human
    Preferences"; beta is the paper's tau.

    TRL 1.16 divides each log-ratio by its completion token count (confirmed with the IPO authors
    to be what the paper's results used): pass `chosen_lengths`/`rejected_lengths`, or pass
    per-token-averaged logps and leave them None. Without either, this is the paper's summed form.
    """
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = _per_token(chosen, chosen_lengths) - _per_token(rejected, rejected_lengths)
    return (delta - 1 / (2 * beta)) ** 2


@register("exo_pair", ranges={"label_smoothing": Range(0, 0.5, low_open=True, high_open=True,
                                                     note="the EXO paper recommends 1e-3")})
def exo_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, label_smoothing=1e-3):
    """EXO-pref, Eq. 16 of "Towards Efficient Exact Optimization of Language Model Alignment":
    KL(p_theta || p_label) over {chosen, rejected} with p_label = [1 - eps, eps], eps = label_smoothing.

    eps must be > 0 (the KL to a one-hot target is infinite); the default is the paper's
    recommended 1e-3 (TRL 1.16 shares DPO's 0.0 and refuses it for exo_pair).
    """
    if label_smoothing <= 0.0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen - rejected)
    log_pw, log_pl = math.log1p(-label_smoothing), math.log(label_smoothing)
    return torch.sigmoid(logits) * (F.logsigmoid(logits) - log_pw) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - log_pl
    )


@register("nca_pair")
def nca_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1):
    """NCA ("Noise Contrastive Alignment of Language Models with Explicit Rewards"): scores each
    reward on its own, so the chosen likelihood is pushed up, not only the margin."""
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


@register("bco_pair")
def bco_pair(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, bco_delta=0.0
):
    """BCO on pairs ("Binary Classifier Optimization for Large Language Model Alignment"): chosen
    and rejected are classified separately around the reward shift `bco_delta`.

    The paper (and TRL < 1.0) sets the shift to a running mean of the detached rewards; that is
    state, so the caller keeps it and passes it in. TRL 1.16 dropped the shift, i.e. bco_delta = 0.
    """
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * chosen - bco_delta) - F.logsigmoid(-(beta * rejected - bco_delta))


@register("sppo_hard")
def sppo_hard(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1):
    """SPPO with hard win probabilities ("Self-Play Preference Optimization for Language Model
    Alignment", Eq. 4.7 with P = 1 for the winner and 0 for the loser)."""
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


@register("aot")
def aot(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """AOT, paired ("Distributional Preference Alignment of LLMs via Optimal Transport").

    Sorting across the batch makes this a distributional loss: the i-th output is the loss of the
    i-th quantile, not of example i, so it needs the whole batch and cannot be weighted per pair.
    """
    logratios, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
    ref_logratios, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
    return _smoothed_sigmoid(beta * (logratios - ref_logratios), label_smoothing)


@register("aot_pair", "aot_unpaired")
def aot_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """AOT, unpaired ("Distributional Preference Alignment of LLMs via Optimal Transport"):
    the chosen and rejected log-ratio distributions are sorted independently.

    TRL < 1.0 called this "aot_pair"; TRL 1.16 renamed it "aot_unpaired". Both names are kept.
    As with `aot`, output i is a quantile's loss, not example i's.
    """
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_sorted, _ = torch.sort(chosen, dim=0)
    rejected_sorted, _ = torch.sort(rejected, dim=0)
    return _smoothed_sigmoid(beta * (chosen_sorted - rejected_sorted), label_smoothing)


@register("apo_zero")
def apo_zero(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1):
    """APO-zero, Eq. 7 of "Anchored Preference Optimization and Contrastive Revisions": for when
    the chosen answers beat the model's own; raises chosen and lowers rejected likelihood."""
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)


@register("apo_down")
def apo_down(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1):
    """APO-down, Eq. 8 of "Anchored Preference Optimization and Contrastive Revisions": for when
    the chosen answers are worse than the model's own; lowers both, the rejected more."""
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))


@register("discopop")
def discopop(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, discopop_tau=0.05
):
    """DiscoPOP / log-ratio modulated loss, Eq. 5 of "Discovering Preference Optimization
    Algorithms with and for Large Language Models"; the paper's tau defaults to 0.05."""
    chosen, rejected = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen - rejected)
    # A sigmoid gate blends the logistic (DPO) and exponential losses by the size of the margin.
    mix = torch.sigmoid(logits / discopop_tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


def add_nll(losses: Tensor, chosen_nll: Tensor, rpo_alpha: float) -> Tensor:
    """RPO ("Iterative Reasoning Preference Optimization"): adds `rpo_alpha * chosen_nll`, the
    NLL of the chosen completion (per example, as the caller defines it: usually per-token mean).
    The one place RPO is applied (the DPO stage's `module.rpo_alpha`, to any loss).

    TRL 1.16 expresses this as loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha], whose
    "sft" term is one token-mean NLL over all chosen tokens of the batch; the batch means agree
    when the caller's per-example NLLs average to that (e.g. equal completion lengths).
    """
    return losses + rpo_alpha * chosen_nll.float()


def _rewards(beta: float, policy_logps: Tensor, ref_logps: Tensor | float = 0.0) -> Tensor:
    return beta * (policy_logps - ref_logps).detach()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str = "sigmoid",
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **params,
) -> tuple[Tensor, Tensor, Tensor]:
    """A reference-based preference loss from `PREFERENCE_LOSSES`, chosen by `loss_type`.

    Inputs are (batch,) sequence log-probabilities under the policy and the frozen reference.
    `params` are the loss's own hyperparameters (`beta`, `label_smoothing`, `discopop_tau`, ...;
    see `loss_parameters`); one it does not declare is a ValueError, and those left out take the
    loss's defaults. The completion token counts `chosen_lengths`/`rejected_lengths` reach only
    the losses that normalise by length (ipo, sigmoid_norm). RPO's NLL term is not added here:
    that is `add_nll`, applied by the caller to any loss.

    Returns (losses, chosen_rewards, rejected_rewards), all (batch,) float32, where
    rewards = beta * (policy - ref) logps, detached (the implicit DPO reward, for logging).
    """
    try:
        fn = PREFERENCE_LOSSES[loss_type]
    except KeyError:
        raise ValueError(
            f"unknown preference loss_type {loss_type!r}; known types: {sorted(PREFERENCE_LOSSES)}"
        ) from None
    declared = loss_parameters(loss_type)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(f"preference loss {loss_type!r} has no parameter {unknown[0]!r}; its parameters: {sorted(declared)}")
    params = {**{k: v for k, v in declared.items() if v is not inspect.Parameter.empty}, **params}
    if all(k in inspect.signature(fn).parameters for k in LENGTH_INPUTS):
        params.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    # bf16 log-probs of long sequences lose the small chosen/rejected differences DPO trains on.
    pc, pr, rc, rr = (
        t.float() for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )
    losses = fn(pc, pr, rc, rr, **params)
    return losses, _rewards(params["beta"], pc, rc), _rewards(params["beta"], pr, rr)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO ("SimPO: Simple Preference Optimization with a Reference-Free Reward"), reference free.

    The caller passes LENGTH-NORMALISED log-probabilities (mean over completion tokens): the
    average is SimPO's reward, and summed logps would make the margin scale with length.
    `gamma` is the absolute target margin, as TRL CPO's `simpo_gamma` (default 0.5; the SimPO
    repo's `gamma_beta_ratio` is gamma / beta). The loss is
    -log sigmoid(beta * (chosen - rejected) - gamma), label-smoothed like cDPO, exactly TRL's
    `CPOTrainer.cpo_loss` with loss_type="simpo" and alpha=0 (its CPO NLL term is `add_nll`).
    beta defaults to 2.0, the SimPO paper's; TRL's CPOConfig shares one beta (0.1) among its losses,
    and its cpo_alpha (1.0: CPO-SimPO) is the DPO stage's rpo_alpha here (off: plain SimPO).

    Returns (losses, chosen_rewards, rejected_rewards); rewards = beta * logps, detached.
    """
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    losses = _smoothed_sigmoid(beta * (pc - pr) - gamma, label_smoothing)
    return losses, _rewards(beta, pc), _rewards(beta, pr)


def _log1mexp(x: Tensor) -> Tensor:
    # log(1 - exp(x)) for x < 0: log1p(-exp(x)) cancels catastrophically near 0, log(-expm1(x))
    # loses precision far below; switching at -ln 2 keeps both accurate (Mächler 2012).
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO ("ORPO: Monolithic Preference Optimization without Reference Model"), Eqs. 4 and 7.

    The logps are per-token averages over each completion and `chosen_nll` is the per-example SFT
    NLL of the chosen completion. Per example: chosen_nll - beta * log sigmoid(log odds ratio),
    with log odds(y) = logp - log(1 - exp(logp)). This is TRL's `ORPOTrainer.odds_ratio_loss`;
    TRL's total `nll - losses.mean()` is the mean of these when `chosen_nll` averages to its NLL.

    Returns (losses, chosen_rewards, rejected_rewards); rewards = beta * logps, detached.
    """
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    losses = chosen_nll.float() - beta * F.logsigmoid(log_odds)
    return losses, _rewards(beta, pc), _rewards(beta, pr)


# The two whose inputs differ from the DPO family's (no reference; per-token averaged logps).
REFERENCE_FREE_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {"simpo": simpo_loss, "orpo": orpo_loss}


def loss_function(name: str) -> Callable:
    """The function of a preference loss name: a registered DPO-family loss, simpo or orpo."""
    fn = PREFERENCE_LOSSES.get(name) or REFERENCE_FREE_LOSSES.get(name)
    if fn is None:
        raise ValueError(f"unknown preference loss {name!r}; known: {sorted([*PREFERENCE_LOSSES, *REFERENCE_FREE_LOSSES])}")
    return fn


def loss_parameters(name: str) -> dict[str, object]:
    """The hyperparameters the loss `name` declares, with their defaults (`inspect.Parameter.empty`
    for one without): its keyword-only arguments, less the batch data in LENGTH_INPUTS."""
    return {p.name: p.default for p in inspect.signature(loss_function(name)).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in LENGTH_INPUTS}


def loss_settings(loss: Mapping | None) -> tuple[str, dict]:
    """A `loss=` config ({name, <hyperparameters>}) checked against what its loss declares:
    (name, every hyperparameter with the config's value or the loss's default). An unknown name,
    an unknown key or a missing value is a ConfigError naming the valid ones."""
    settings = dict(loss or {})
    name = settings.pop("name", None)
    known = sorted([*PREFERENCE_LOSSES, *REFERENCE_FREE_LOSSES])
    if name not in known:
        raise ConfigError(f"loss={name}: expected one of {', '.join(known)} (conf/loss/<name>.yaml)")
    declared = loss_parameters(name)
    for key in settings:
        if key not in declared:
            raise ConfigError(f"loss.{key} is not a parameter of loss={name}; its parameters: {', '.join(declared)}")
    params = {**declared, **settings}
    for key, value in params.items():
        if value is inspect.Parameter.empty:
            raise ConfigError(f"loss.{key} is not set; loss={name} needs it")
        if isinstance(declared[key], float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"loss.{key}={value}: expected a number")
    check_ranges(params, parameter_ranges(name), "loss")
    return name, params


def parameter_ranges(name: str) -> dict[str, Range]:
    """The allowed range of each hyperparameter of the loss `name` that has one."""
    return {k: r for k, r in {**PARAMETER_RANGES, **LOSS_RANGES.get(name, {})}.items() if k in loss_parameters(name)}


__all__ = [
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "add_nll",
    "dpo_loss",
    "loss_function",
    "loss_parameters",
    "loss_settings",
    "orpo_loss",
    "parameter_ranges",
    "register",
    "simpo_loss",
]
