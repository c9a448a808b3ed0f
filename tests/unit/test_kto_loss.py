"""KTO: the loss on hand-computed numbers and equal to TRL 1.16's KTOTrainer on the same tensors; the
reference point (detach, mean over ranks, clamp); TRL's mismatched KL pairs; the class-balance advice."""

import dataclasses
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llm_stages.data.kinds.unpaired import UnpairedExample, collate_unpaired, kl_partners, mismatched, with_kl_rows
from llm_stages.data.render import IGNORE_INDEX, Example
from llm_stages.losses.kto import kl_reference_point, kto_loss, weight_advice


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_hand_computed_kto_and_apo_zero_unpaired():
    policy, ref = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -18.0, -5.0])  # log-ratios 2, -2, 0
    labels = torch.tensor([True, False, True])
    losses, rewards = kto_loss(policy, ref, labels, 0.5, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    expected = [1 - sig(0.1 * (2 - 0.5)), 2 * (1 - sig(0.1 * (0.5 + 2))), 1 - sig(0.1 * (0 - 0.5))]
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-7, rtol=0)
    torch.testing.assert_close(rewards, torch.tensor([0.2, -0.2, 0.0]))
    assert not rewards.requires_grad
    losses, _ = kto_loss(policy, ref, labels, 0.5, loss_type="apo_zero_unpaired", beta=0.1, undesirable_weight=2.0)
    torch.testing.assert_close(losses, torch.tensor([1 - sig(0.2), 2 * sig(-0.2), 1 - sig(0.0)]), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="apo_zero_unpaired"):
        kto_loss(policy, ref, labels, 0.0, loss_type="bco")


def test_reference_point_is_detached_averaged_over_ranks_then_clamped():
    kl_logps = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref_kl = torch.tensor([-4.0, -5.0])  # mean log-ratio 0.5
    z0 = kl_reference_point(kl_logps, ref_kl)
    assert z0.item() == 0.5 and not z0.requires_grad
    assert kl_reference_point(ref_kl, kl_logps.detach()).item() == 0.0  # -0.5 clamped
    # Another rank's mean is -1.5: the mean of means is -0.5, clamped to 0 — not max(0.5, 0) averaged with 0.
    assert kl_reference_point(kl_logps, ref_kl, lambda kl: (kl + torch.tensor(-1.5)) / 2).item() == 0.0
    assert kl_reference_point(kl_logps, ref_kl, lambda kl: (kl + torch.tensor(1.5)) / 2).item() == 1.0


def _example(prompt: list[int], reply: list[int], label: bool) -> UnpairedExample:
    return UnpairedExample(Example(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply), label)


def test_kl_rows_pair_each_prompt_with_the_previous_reply_of_its_chunk_as_trl():
    assert kl_partners(5, 2) == [1, 0, 3, 2, 4]  # TRL: [y_last] + y[:-1] within each batch of 2
    assert kl_partners(4, 4) == [3, 0, 1, 2]
    examples = [_example([1, 2], [10], True), _example([3], [20, 21], False), _example([4, 5, 6], [30], True)]
    rows = with_kl_rows(examples, batch_size=3, max_length=16)
    assert [e.index for e in rows] == [0, 1, 2]
    assert [e.kl.input_ids for e in rows] == [[1, 2, 30], [3, 10], [4, 5, 6, 20, 21]]
    assert rows[2].kl.labels == [IGNORE_INDEX] * 3 + [20, 21]  # only the borrowed reply is scored
    assert mismatched(examples[2].completion, examples[1].completion, max_length=4).input_ids == [4, 5, 6, 20]
    batch = collate_unpaired(rows, pad_id=0)  # completion rows first, then their KL rows
    assert batch.input_ids.tolist() == [[1, 2, 10, 0, 0], [3, 20, 21, 0, 0], [4, 5, 6, 30, 0],
                                        [1, 2, 30, 0, 0], [3, 10, 0, 0, 0], [4, 5, 6, 20, 21]]
    assert batch.label.tolist() == [True, False, True] and batch.kl_rows().input_ids.shape == (3, 5)


@pytest.mark.parametrize("counts,weights,advice", [
    ((100, 100), (1.0, 1.0), None),
    ((100, 50), (1.0, 1.0), "desirable_weight in [0.5, 0.67] OR module.undesirable_weight in [1.5, 2.0]"),
    ((100, 50), (1.0, 1.8), None),  # 100 / (1.8 * 50) = 1.11: in range
    ((20, 100), (1.0, 1.0), "desirable_weight in [5.0, 6.65] OR module.undesirable_weight in [0.15, 0.2]"),
])
def test_class_balance_advice_has_trls_ranges(counts, weights, advice):
    got = weight_advice(*counts, *weights)
    assert got == advice if advice is None else advice in got


# --- parity with TRL 1.16 --------------------------------------------------------------------------
# TRL 1.16 has no standalone KTO loss: it lives in KTOTrainer._compute_loss, which runs the model on the
# completion and KL sequences and returns the batch mean. We call it unbound on a stub `self` with a fake
# model whose per-token log-probs sum to the sequence logps we choose (references precomputed). Per-example
# losses: TRL's loss is a nanmean, so NaN policy logps on all but one example leave that example's loss.


def _trl_kto(policy, ref, kl_logps, ref_kl, labels, *, loss_type, beta, desirable_weight, undesirable_weight,
             gather=lambda t: t):
    from trl.trainer.kto_trainer import KTOTrainer

    n, width = policy.numel(), 4
    input_ids, kl_input_ids = torch.ones(n, width, dtype=torch.long), torch.ones(n, width, dtype=torch.long)

    def fake_model(**kwargs):
        log_probs = torch.zeros(n, width - 1)
        log_probs[:, 0] = kl_logps if kwargs["input_ids"] is kl_input_ids else policy
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                               mean_logits=torch.zeros_like(log_probs))

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=gather),
        aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=loss_type == "kto", loss_type=loss_type,
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)
    mask = torch.ones(n, width, dtype=torch.long)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "completion_mask": mask, "label": labels,
              "KL_input_ids": kl_input_ids, "KL_attention_mask": mask, "KL_completion_mask": mask,
              "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = KTOTrainer._compute_loss(stub, fake_model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def _batch(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy, ref = -(torch.rand(n, generator=g) * 30 + 2), -(torch.rand(n, generator=g) * 30 + 2)
    kl_logps, ref_kl = -(torch.rand(n, generator=g) * 30 + 2), -(torch.rand(n, generator=g) * 30 + 2)
    labels = torch.tensor([True, False, True, True, False, False, True][:n])
    return policy, ref, kl_logps, ref_kl, labels


@pytest.mark.parametrize("loss_type,beta,desirable_weight,undesirable_weight", [
    ("kto", 0.1, 1.0, 1.0), ("kto", 0.5, 1.33, 0.75), ("apo_zero_unpaired", 0.1, 1.0, 2.0),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_kto_loss_matches_trl(loss_type, beta, desirable_weight, undesirable_weight, seed):
    pytest.importorskip("trl")
    params = dict(loss_type=loss_type, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    policy, ref, kl_logps, ref_kl, labels = _batch(seed=seed)
    if seed == 1:
        ref_kl = kl_logps - torch.linspace(-1, 3, 7)  # a positive reference point (seed 0's is clamped to 0)
    kl = kl_reference_point(kl_logps, ref_kl) if loss_type == "kto" else 0.0
    losses, rewards = kto_loss(policy, ref, labels, kl, **params)
    trl_loss, metrics = _trl_kto(policy, ref, kl_logps, ref_kl, labels, **params)
    torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-6, rtol=1e-6)
    for i in range(len(labels)):  # each example's own loss
        only_i = torch.where(torch.arange(len(labels)) == i, policy, torch.tensor(float("nan")))
        trl_i, _ = _trl_kto(only_i, ref, kl_logps, ref_kl, labels, **params)
        torch.testing.assert_close(losses[i], trl_i, atol=1e-6, rtol=1e-6)
    assert metrics["kl"] == pytest.approx(float(kl), abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(rewards[labels].mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(rewards[~labels].mean().item(), abs=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(policy[labels].mean().item(), abs=1e-5)


def test_reference_point_over_ranks_matches_trl():
    """TRL gathers each rank's batch-mean KL, averages and only then clamps: a second rank's mean of -2."""
    pytest.importorskip("trl")
    policy, ref, kl_logps, ref_kl, labels = _batch()
    ref_kl = kl_logps - 1.0  # this rank's mean is 1.0: with the other rank, (1 - 2) / 2 < 0 -> 0
    other = torch.tensor(-2.0)
    gather = lambda t: torch.stack([t, other]) if t.dim() == 0 and t.dtype.is_floating_point else t  # noqa: E731
    z0 = kl_reference_point(kl_logps, ref_kl, lambda kl: (kl + other) / 2)
    trl_loss, metrics = _trl_kto(policy, ref, kl_logps, ref_kl, labels, loss_type="kto", beta=0.1,
                                 desirable_weight=1.0, undesirable_weight=1.0, gather=gather)
    assert z0.item() == 0.0 and metrics["kl"] == 0.0
    torch.testing.assert_close(kto_loss(policy, ref, labels, z0).losses.mean(), trl_loss, atol=1e-6, rtol=1e-6)


def test_defaults_match_trls_kto_config():
    pytest.importorskip("trl")
    import inspect

    from trl.trainer.kto_config import KTOConfig

    trl = {f.name: f.default for f in dataclasses.fields(KTOConfig)}
    ours = {k: p.default for k, p in inspect.signature(kto_loss).parameters.items() if p.default is not p.empty}
    assert ours == {k: trl[k] for k in ours}
