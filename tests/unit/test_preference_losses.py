"""Preference losses: hand-computed values, parity with TRL 1.16's own code, and the API contract."""

import dataclasses
import inspect
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llm_stages.losses import PREFERENCE_LOSSES, dpo_loss, orpo_loss, simpo_loss
from llm_stages.losses.preference import add_nll, loss_parameters, register

# Three pairs of summed sequence log-probs: policy chosen/rejected, reference chosen/rejected.
PC = [-10.0, -22.5, -7.25]
PR = [-12.0, -20.0, -9.5]
RC = [-11.0, -21.0, -8.0]
RR = [-11.5, -21.5, -9.0]
CHOSEN_LEN = [4, 10, 1]
REJECTED_LEN = [5, 2, 8]
BETA = 0.5


def declared(loss_type, **params):
    """The params that loss_type declares (a loss refuses the others)."""
    return {k: v for k, v in params.items() if k in loss_parameters(loss_type)}


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def tensors(*lists):
    return [torch.tensor(v) for v in lists]


# Per-pair log-ratios c = pc - rc and r = pr - rr, the quantities most losses are written in.
C = [pc - rc for pc, rc in zip(PC, RC)]  # [1.0, -1.5, 0.75]
R = [pr - rr for pr, rr in zip(PR, RR)]  # [-0.5, 1.5, -0.5]
b = BETA

# loss_type -> (label_smoothing, extra kwargs, expected loss of pair (c, r) written with math only)
HAND = {
    "sigmoid": (0.0, {}, lambda c, r: -logsig(b * (c - r))),
    "hinge": (0.0, {}, lambda c, r: max(0.0, 1 - b * (c - r))),
    "nca_pair": (0.0, {}, lambda c, r: -logsig(b * c) - 0.5 * logsig(-b * c) - 0.5 * logsig(-b * r)),
    "bco_pair": (0.0, {}, lambda c, r: -logsig(b * c) - logsig(-b * r)),
    "sppo_hard": (0.0, {}, lambda c, r: (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2),
    "apo_zero": (0.0, {}, lambda c, r: (1 - sig(b * c)) + sig(b * r)),
    "apo_down": (0.0, {}, lambda c, r: sig(b * c) + (1 - sig(b * (c - r)))),
    "ipo": (0.0, {}, lambda c, r: ((c - r) - 1 / (2 * b)) ** 2),
}


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_hand_computed_elementwise_losses(loss_type):
    label_smoothing, kwargs, expected = HAND[loss_type]
    losses, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type=loss_type,
                            **declared(loss_type, label_smoothing=label_smoothing), **kwargs)
    assert losses.tolist() == pytest.approx([expected(c, r) for c, r in zip(C, R)], abs=1e-6)


def test_hand_computed_cdpo_and_robust():
    eps = 0.1
    cdpo, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="sigmoid", label_smoothing=eps)
    robust, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="robust", label_smoothing=eps)
    exp_cdpo = [-(1 - eps) * logsig(b * (c - r)) - eps * logsig(-b * (c - r)) for c, r in zip(C, R)]
    exp_robust = [
        (-(1 - eps) * logsig(b * (c - r)) + eps * logsig(-b * (c - r))) / (1 - 2 * eps) for c, r in zip(C, R)
    ]
    assert cdpo.tolist() == pytest.approx(exp_cdpo, abs=1e-6)
    assert robust.tolist() == pytest.approx(exp_robust, abs=1e-6)


def test_hand_computed_exo_pair():
    eps = 1e-3
    losses, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="exo_pair", label_smoothing=eps)
    # KL between the policy's 2-way softmax [qw, ql] and the smoothed label [1 - eps, eps]
    expected = []
    for c, r in zip(C, R):
        qw, ql = sig(b * (c - r)), sig(-b * (c - r))
        expected.append(qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps))
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_discopop():
    tau = 0.05
    losses, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="discopop", discopop_tau=tau)
    expected = []
    for c, r in zip(C, R):
        x = b * (c - r)
        mix = sig(x / tau)
        expected.append(-logsig(x) * (1 - mix) + math.exp(-x) * mix)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_bco_reward_shift():
    delta = 0.3
    losses, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="bco_pair", bco_delta=delta)
    expected = [-logsig(b * c - delta) - logsig(-(b * r - delta)) for c, r in zip(C, R)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_length_normalised_ipo_and_sigmoid_norm():
    lengths = dict(chosen_lengths=torch.tensor(CHOSEN_LEN), rejected_lengths=torch.tensor(REJECTED_LEN))
    ipo, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="ipo", **lengths)
    norm, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="sigmoid_norm", **lengths)
    per_token = [(c / lc - r / lr) for c, r, lc, lr in zip(C, R, CHOSEN_LEN, REJECTED_LEN)]
    assert ipo.tolist() == pytest.approx([(d - 1 / (2 * b)) ** 2 for d in per_token], abs=1e-6)
    assert norm.tolist() == pytest.approx([-logsig(b * d) for d in per_token], abs=1e-6)


def test_hand_computed_aot_sorts_across_the_batch():
    eps = 0.1
    aot, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="aot", label_smoothing=eps)
    aot_pair, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="aot_pair", label_smoothing=eps)

    def smoothed(x):
        return -(1 - eps) * logsig(b * x) - eps * logsig(-b * x)

    # aot: sorted policy margins vs sorted reference margins
    policy_margins = sorted(pc - pr for pc, pr in zip(PC, PR))  # [-2.5, 2.0, 2.25]
    ref_margins = sorted(rc - rr for rc, rr in zip(RC, RR))  # [0.5, 0.5, 1.0]
    assert aot.tolist() == pytest.approx([smoothed(p - q) for p, q in zip(policy_margins, ref_margins)], abs=1e-6)
    # aot_pair (TRL 1.16: aot_unpaired): sorted chosen log-ratios vs sorted rejected log-ratios
    expected = [smoothed(c - r) for c, r in zip(sorted(C), sorted(R))]
    assert aot_pair.tolist() == pytest.approx(expected, abs=1e-6)
    assert PREFERENCE_LOSSES["aot_unpaired"] is PREFERENCE_LOSSES["aot_pair"]


def test_hand_computed_simpo():
    pc, pr = [-0.8, -1.9, -0.3], [-1.1, -1.2, -2.0]  # per-token averages
    for beta, gamma, eps in [(2.0, 0.5, 0.0), (2.5, 1.0, 0.1)]:
        losses, chosen_r, rejected_r = simpo_loss(*tensors(pc, pr), beta=beta, gamma=gamma, label_smoothing=eps)
        x = [beta * (c - r) - gamma for c, r in zip(pc, pr)]
        assert losses.tolist() == pytest.approx([-(1 - eps) * logsig(v) - eps * logsig(-v) for v in x], abs=1e-6)
        assert chosen_r.tolist() == pytest.approx([beta * v for v in pc], abs=1e-6)
        assert rejected_r.tolist() == pytest.approx([beta * v for v in pr], abs=1e-6)


def test_hand_computed_orpo():
    pc, pr, nll = [-0.4, -1.5, -1e-3], [-0.9, -0.6, -2.0], [0.4, 1.5, 0.01]  # per-token averages

    def log_odds(logp):
        return logp - math.log(1 - math.exp(logp))

    losses, chosen_r, rejected_r = orpo_loss(*tensors(pc, pr, nll), beta=0.1)
    expected = [n - 0.1 * logsig(log_odds(c) - log_odds(r)) for c, r, n in zip(pc, pr, nll)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.1 * v for v in pc], abs=1e-6)
    assert rejected_r.tolist() == pytest.approx([0.1 * v for v in pr], abs=1e-6)


# --- API contract -------------------------------------------------------------------------------


def test_rewards_are_detached_beta_times_logratio_and_losses_carry_grad():
    pc, pr, rc, rr = tensors(PC, PR, RC, RR)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    for loss_type in PREFERENCE_LOSSES:
        eps = 1e-3 if loss_type == "exo_pair" else 0.0
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type,
                                                **declared(loss_type, label_smoothing=eps))
        assert losses.shape == (3,) and losses.dtype == torch.float32 and losses.requires_grad
        assert not chosen_r.requires_grad and not rejected_r.requires_grad
        assert chosen_r.tolist() == pytest.approx([b * c for c in C], abs=1e-6)
        assert rejected_r.tolist() == pytest.approx([b * r for r in R], abs=1e-6)


def test_low_precision_inputs_are_computed_in_float32():
    losses, chosen_r, _ = dpo_loss(*(t.bfloat16() for t in tensors(PC, PR, RC, RR)), beta=BETA)
    assert losses.dtype == chosen_r.dtype == torch.float32
    losses, _, _ = simpo_loss(torch.tensor([-1.0]).half(), torch.tensor([-2.0]).half())
    assert losses.dtype == torch.float32


def test_unknown_loss_type_names_the_known_ones():
    with pytest.raises(ValueError) as err:
        dpo_loss(*tensors(PC, PR, RC, RR), loss_type="nope")
    for name in ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                 "apo_zero", "apo_down", "aot", "aot_pair", "discopop"]:
        assert name in PREFERENCE_LOSSES
        assert repr(name) in str(err.value)


def test_invalid_label_smoothing_is_rejected():
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(*tensors(PC, PR, RC, RR), loss_type="exo_pair", label_smoothing=0.0)
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(*tensors(PC, PR, RC, RR), loss_type="robust", label_smoothing=0.5)


def test_rpo_alpha_adds_exactly_alpha_times_nll():
    nll = torch.tensor([0.7, 1.3, 2.9])
    base, chosen_r, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="ipo")
    rpo = add_nll(base, nll, 0.5)
    assert (rpo - base).tolist() == pytest.approx([0.35, 0.65, 1.45], abs=1e-6)
    # RPO is applied in one place, add_nll (by the DPO stage, to any loss): no loss takes rpo_alpha.
    with pytest.raises(ValueError, match="rpo_alpha"):
        dpo_loss(*tensors(PC, PR, RC, RR), loss_type="ipo", rpo_alpha=0.5)


def test_register_adds_a_loss_that_dpo_loss_dispatches_to():
    @register("test_margin")
    def margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, **_):
        return -beta * (chosen_logps - rejected_logps)

    try:
        losses, _, _ = dpo_loss(*tensors(PC, PR, RC, RR), beta=BETA, loss_type="test_margin")
        assert losses.tolist() == pytest.approx([-b * (pc - pr) for pc, pr in zip(PC, PR)])
        with pytest.raises(ValueError, match="already registered"):
            register("test_margin")(margin)
    finally:
        del PREFERENCE_LOSSES["test_margin"]


# --- parity with TRL 1.16's own code ------------------------------------------------------------
# TRL 1.16 has no standalone DPO loss: the formulas live inside DPOTrainer._compute_loss, which runs
# the model and reduces to a batch mean. We call that method unbound on a stub `self`, with a fake
# model whose per-token log-probs sum to the sequence logps we choose (refs go in as precomputed
# columns). Per-example losses come out through TRL's WPO weighting: weights of exactly 1 for pair
# i and 0 for the others leave mean = loss_i / batch. An unweighted call checks the batch mean too.


def _trl_config_defaults(config_cls):
    return {f.name: f.default for f in dataclasses.fields(config_cls) if f.default is not dataclasses.MISSING}


def _trl_dpo(loss_type, pc, pr, rc, rr, chosen_len, rejected_len, *, beta, label_smoothing, discopop_tau,
             pair=None):
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    n = pc.numel()
    lengths = torch.cat([chosen_len, rejected_len])  # batch is [chosen..., rejected...], as in TRL
    width = int(lengths.max()) + 1  # column 0 is the prompt token
    cols = torch.arange(width)[None, :]
    completion_mask = ((cols >= 1) & (cols <= lengths[:, None])).long()
    log_probs = torch.zeros(2 * n, width - 1)
    log_probs[:, 0] = torch.cat([pc, pr])  # token-summed by TRL back to the sequence logp
    # log_sum_sq_probs = log_probs gives WPO weight exp(0) = 1; +1e4 gives exp(-1e4) = 0.
    keep = torch.ones(n, dtype=torch.bool) if pair is None else torch.arange(n) == pair
    log_sum_sq_probs = log_probs + 1e4 * (~torch.cat([keep, keep])).float()[:, None]
    outputs = SimpleNamespace(
        log_probs=log_probs,
        log_sum_sq_probs=log_sum_sq_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
    )
    defaults = _trl_config_defaults(DPOConfig)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=defaults["ld_alpha"],
        f_divergence_type=defaults["f_divergence_type"],
        f_alpha_divergence_coef=defaults["f_alpha_divergence_coef"],
        beta=beta,
        label_smoothing=label_smoothing,
        loss_types=[loss_type],
        loss_weights=[1.0],
        use_weighting=pair is not None,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
    )
    inputs = {
        "input_ids": torch.ones(2 * n, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(stub, lambda **_: outputs, inputs, return_outputs=False)
    return loss * n if pair is not None else loss


def _pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(n, generator=g) * 30 + 2) for _ in range(4))
    chosen_len, rejected_len = (torch.randint(1, 12, (n,), generator=g) for _ in range(2))
    return pc, pr, rc, rr, chosen_len, rejected_len


# (TRL loss_type, our loss_type, beta, label_smoothing, discopop_tau)
PARITY = [
    ("sigmoid", "sigmoid", 0.1, 0.0, 0.05),
    ("robust", "robust", 0.1, 0.0, 0.05),
    ("robust", "robust", 0.1, 0.2, 0.05),
    ("hinge", "hinge", 0.1, 0.0, 0.05),
    ("ipo", "ipo", 0.1, 0.0, 0.05),
    ("ipo", "ipo", 0.5, 0.0, 0.05),
    ("exo_pair", "exo_pair", 0.1, 1e-3, 0.05),
    ("nca_pair", "nca_pair", 0.1, 0.0, 0.05),
    ("bco_pair", "bco_pair", 0.1, 0.0, 0.05),
    ("sppo_hard", "sppo_hard", 0.5, 0.0, 0.05),
    ("aot", "aot", 0.1, 0.0, 0.05),
    ("aot", "aot", 0.1, 0.1, 0.05),
    ("aot_unpaired", "aot_pair", 0.1, 0.0, 0.05),
    ("aot_unpaired", "aot_unpaired", 0.1, 0.1, 0.05),
    ("apo_zero", "apo_zero", 0.1, 0.0, 0.05),
    ("apo_down", "apo_down", 0.1, 0.0, 0.05),
    ("discopop", "discopop", 0.1, 0.0, 0.05),
    ("discopop", "discopop", 0.3, 0.0, 0.5),
    ("sigmoid_norm", "sigmoid_norm", 0.1, 0.0, 0.05),
]


@pytest.mark.parametrize("trl_type,ours,beta,label_smoothing,tau", PARITY)
def test_dpo_losses_match_trl(trl_type, ours, beta, label_smoothing, tau):
    pytest.importorskip("trl")
    for pc, pr, rc, rr, chosen_len, rejected_len in [(*tensors(PC, PR, RC, RR), *tensors(CHOSEN_LEN, REJECTED_LEN)),
                                                     _pairs()]:
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=ours,
                                **declared(ours, label_smoothing=label_smoothing, discopop_tau=tau),
                                chosen_lengths=chosen_len, rejected_lengths=rejected_len)
        common = dict(beta=beta, label_smoothing=label_smoothing, discopop_tau=tau)
        trl_per_pair = torch.stack([_trl_dpo(trl_type, pc, pr, rc, rr, chosen_len, rejected_len, pair=i, **common)
                                    for i in range(pc.numel())])
        torch.testing.assert_close(losses, trl_per_pair, atol=1e-6, rtol=1e-6)
        trl_mean = _trl_dpo(trl_type, pc, pr, rc, rr, chosen_len, rejected_len, **common)
        torch.testing.assert_close(losses.mean(), trl_mean, atol=1e-6, rtol=1e-6)


def test_trl_116_sigmoid_ignores_label_smoothing_where_ours_is_cdpo():
    pytest.importorskip("trl")
    pc, pr, rc, rr, cl, rl = _pairs()
    trl_smoothed = _trl_dpo("sigmoid", pc, pr, rc, rr, cl, rl, beta=0.1, label_smoothing=0.2, discopop_tau=0.05)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    cdpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid", label_smoothing=0.2)
    torch.testing.assert_close(plain.mean(), trl_smoothed, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(cdpo.mean(), trl_smoothed)


def test_simpo_matches_trl_cpo_loss():
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    g = torch.Generator().manual_seed(1)
    pc, pr = -torch.rand(8, generator=g) * 3, -torch.rand(8, generator=g) * 3  # per-token averages
    for beta, gamma, eps in [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.15)]:
        stub = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
        expected = CPOTrainer.cpo_loss(stub, pc, pr)
        got = simpo_loss(pc, pr, beta=beta, gamma=gamma, label_smoothing=eps)
        for ours, theirs in zip(got, expected):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_orpo_matches_trl_odds_ratio_loss():
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    # per-token averages, including values either side of the -ln 2 branch of log(1 - exp(x)) and near 0
    pc = torch.tensor([-0.4, -1.5, -1e-4, -0.69, -0.70, -3.0])
    pr = torch.tensor([-0.9, -0.6, -2.0, -0.70, -0.69, -1e-3])
    nll = torch.tensor([0.5, 1.2, 0.01, 0.8, 0.7, 2.5])
    for beta in [0.1, 0.25]:
        stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
        trl_losses, trl_chosen_r, trl_rejected_r, _, _ = ORPOTrainer.odds_ratio_loss(stub, pc, pr)
        losses, chosen_r, rejected_r = orpo_loss(pc, pr, nll, beta=beta)
        # TRL's `losses` is beta * log sigmoid(log odds), subtracted from its NLL term
        torch.testing.assert_close(losses, nll - trl_losses, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(chosen_r, trl_chosen_r, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rejected_r, trl_rejected_r, atol=1e-6, rtol=1e-6)


def test_defaults_match_trl_configs():
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_config import CPOConfig
    from trl.experimental.orpo.orpo_config import ORPOConfig
    from trl.trainer.dpo_config import DPOConfig

    dpo, cpo, orpo = (_trl_config_defaults(c) for c in (DPOConfig, CPOConfig, ORPOConfig))
    ours = loss_parameters("sigmoid")
    assert ours["beta"] == dpo["beta"]
    assert ours["label_smoothing"] == dpo["label_smoothing"]
    assert all(loss_parameters(name)["beta"] == dpo["beta"] for name in PREFERENCE_LOSSES)
    assert inspect.signature(PREFERENCE_LOSSES["discopop"]).parameters["discopop_tau"].default == dpo["discopop_tau"]
    assert inspect.signature(simpo_loss).parameters["gamma"].default == cpo["simpo_gamma"]
    assert inspect.signature(orpo_loss).parameters["beta"].default == orpo["beta"]
