"""KTO on the tiny model and the demo's unpaired feedback: it trains, logs TRL's metric names, exports,
and both reference modes give the same first step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_stages.errors import ConfigError
from llm_stages.train import train
from tests.integration.test_training import _build, _first_step_grads

TRL_NAMES = ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
             "logits/chosen", "logits/rejected"]


def test_kto_trains_logs_trls_metrics_and_exports(make_cfg, tmp_path):
    metrics = train(make_cfg("stage=kto", "trainer.max_steps=6", "trainer.val_check_interval=6", "optim.lr=2e-3",
                             "trainer.log_every_n_steps=1", "datamodule.val_batch_size=64", output_dir=tmp_path / "kto"))
    assert metrics["steps"] == 6
    # Before any update the policy is the reference: every reward and the reference point are 0, each loss 1/2.
    assert metrics["val/loss_before"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["val/rewards/margins_before"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["val/kl_before"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["val/kl"] > 0 and metrics["val/loss"] != metrics["val/loss_before"]  # the policy moved
    for name in [*TRL_NAMES, "desirable_fraction", "rewards/label_accuracy"]:
        assert f"val/{name}" in metrics and f"train/{name}" in metrics, name
    margins = metrics["val/rewards/chosen"] - metrics["val/rewards/rejected"]
    assert metrics["val/rewards/margins"] == pytest.approx(margins, abs=1e-6)
    assert AutoModelForCausalLM.from_pretrained(metrics["export_dir"]).config.model_type == "qwen2"


def test_a_kto_gradient_step_lowers_the_loss_of_its_batch(make_cfg):
    module, datamodule = _build(make_cfg("stage=kto", "module.ref=copy"))
    datamodule.setup()
    batch = datamodule.collate_one(datamodule.train_set[:8])
    module.model.train()
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = module.loss_sum(batch)[0] / batch.num_examples
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[0] == pytest.approx(0.5, abs=1e-6)  # policy = reference: every loss is 1 - sigmoid(0)
    assert losses[2] < losses[1] < losses[0]


def test_kto_precompute_and_copy_give_the_same_first_step(make_cfg):
    common = ["stage=kto", "optim.max_grad_norm=null", "datamodule.batch_size=4"]
    grads_pre, module_pre, _ = _first_step_grads(make_cfg(*common, "module.ref=precompute"))
    grads_copy, module_copy, _ = _first_step_grads(make_cfg(*common, "module.ref=copy"))
    assert module_pre.reference is None and module_copy.reference is not None
    assert grads_pre.keys() == grads_copy.keys() and grads_pre
    for name in grads_pre:
        torch.testing.assert_close(grads_pre[name], grads_copy[name], atol=1e-6, rtol=1e-5)


def test_kto_settings_that_cannot_work_are_one_line_errors(make_cfg):
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        _build(make_cfg("stage=kto", "datamodule.batch_size=1"))
    with pytest.raises(ConfigError, match="module.loss_type=bco: expected one of kto, apo_zero_unpaired"):
        _build(make_cfg("stage=kto", "module.loss_type=bco"))
