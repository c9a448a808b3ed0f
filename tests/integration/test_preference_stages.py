"""RM and DPO on the tiny model: exports load as standard HF models, reference modes agree, real data trains."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from llm_stages.data.kinds.pair import collate_pairs
from llm_stages.train import train
from tests.conftest import SHARED_DATA
from tests.integration.test_training import _build, _first_step_grads


def test_rm_trains_and_its_export_gives_identical_scores(make_cfg, tmp_path, tokenizer):
    metrics = train(make_cfg("stage=rm", "trainer.max_steps=20", "trainer.val_check_interval=20", "optim.lr=1e-3",
                             "callbacks=default", output_dir=tmp_path / "rm"))
    assert metrics["steps"] == 20
    for key in ["val/accuracy", "val/margin", "val/reward_chosen", "val/reward_rejected", "val/calibration_ece",
                "val/length_bias/reward_length_corr"]:
        assert key in metrics
    exported = AutoModelForSequenceClassification.from_pretrained(metrics["export_dir"]).eval()
    ckpt = torch.load(tmp_path / "rm" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    module, datamodule = _build(make_cfg("stage=rm"))
    module.load_state_dict(ckpt)
    module.eval()
    datamodule.setup()
    batch = collate_pairs(datamodule.val_set[:6], tokenizer.pad_token_id)
    with torch.no_grad():
        ours = torch.cat(module.rewards(batch))
        theirs = exported(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_dpo_precompute_and_copy_give_the_same_first_step(make_cfg):
    common = ["stage=dpo", "optim.max_grad_norm=null"]
    grads_pre, module_pre, _ = _first_step_grads(make_cfg(*common, "module.ref=precompute"))
    grads_copy, module_copy, _ = _first_step_grads(make_cfg(*common, "module.ref=copy"))
    assert module_pre.reference is None and module_copy.reference is not None
    for name in grads_pre:
        torch.testing.assert_close(grads_pre[name], grads_copy[name], atol=1e-6, rtol=1e-5)


def test_dpo_initial_loss_is_log2_and_training_separates_rewards(make_cfg, tmp_path):
    metrics = train(make_cfg("stage=dpo", "trainer.max_steps=15", "trainer.val_check_interval=15", "optim.lr=1e-3",
                             output_dir=tmp_path / "dpo"))
    # Before any update the policy equals the reference: every implicit reward is 0 and the loss log(2).
    assert metrics["val/loss_before"] == pytest.approx(0.693147, abs=1e-5)
    assert metrics["val/rewards/margins_before"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["train/rewards/margins"] > 0  # the policy moved towards the chosen replies
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected"]:
        assert f"val/{key}" in metrics and f"train/{key}" in metrics
    assert AutoModelForCausalLM.from_pretrained(metrics["export_dir"]).config.model_type == "qwen2"


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "simpo", "orpo"])
def test_dpo_loss_variants_train(make_cfg, tmp_path, loss_type):
    metrics = train(make_cfg("stage=dpo", f"loss={loss_type}", "trainer.max_steps=3", "export.enabled=false",
                             "validate_before_fit=false", output_dir=tmp_path / loss_type))
    assert metrics["steps"] == 3 and torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_rpo_alpha_adds_alpha_times_the_chosen_nll_to_any_loss(make_cfg, tokenizer, loss):
    losses = {}
    for rpo_alpha in ["null", "0.5"]:
        module, datamodule = _build(make_cfg("stage=dpo", f"loss={loss}", "module.ref=copy", f"module.rpo_alpha={rpo_alpha}"))
        datamodule.setup()
        batch = collate_pairs(datamodule.val_set[:4], tokenizer.pad_token_id)
        with torch.no_grad():
            losses[rpo_alpha] = module.loss_sum(batch)[0]
            logps, n_tokens, _ = module.score(module.model, batch)
    chosen_nll = -(logps / n_tokens.clamp(min=1))[:batch.num_pairs]  # per-token NLL of each chosen reply
    torch.testing.assert_close(losses["0.5"] - losses["null"], 0.5 * chosen_nll.sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("stage", ["rm", "dpo"])
@pytest.mark.parametrize("data", ["dpo_zh", "dpo_en_demo"])
def test_real_preference_data_trains_a_few_steps(make_cfg, tmp_path, stage, data):
    metrics = train(make_cfg(f"stage={stage}", f"data={data}", f"paths.shared_data_dir={SHARED_DATA}",
                             "trainer.max_steps=2", "datamodule.batch_size=2", "datamodule.max_length=256",
                             "datamodule.max_prompt_length=128", "export.enabled=false", "validate_before_fit=false", output_dir=tmp_path / f"{stage}_{data}"))
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))
