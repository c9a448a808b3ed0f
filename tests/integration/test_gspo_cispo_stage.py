"""GRPO with GSPO's sequence-level ratio and with CISPO's loss: a run trains and logs, and the settings
are checked in one line when the stage is built."""

from __future__ import annotations

import math

import pytest

from llm_stages.errors import ConfigError
from llm_stages.train import build, train

FAST = ["trainer.max_steps=2", "datamodule.batch_size=2", "datamodule.val_batch_size=4", "trainer.limit_val_batches=1",
        "validate_before_fit=false", "rollout.generation.max_new_tokens=6", "module.num_generations=4",
        "module.mini_batch_size=8", "module.ppo_epochs=1"]
DIGIT = ("+rollout.rewards.digit={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, "
         "_partial_: true, pattern: '.*[0-9].*'}}")


@pytest.mark.parametrize("overrides", [["module.importance_sampling_level=sequence"],
                                       ["module.loss_type=cispo", "module.epsilon_high=4.0"]])
def test_grpo_trains_with_gspo_and_cispo(make_cfg, overrides):
    metrics = train(make_cfg("stage=grpo", *FAST, DIGIT, "optim.lr=1e-2", *overrides))
    assert metrics["steps"] >= 2 and math.isfinite(metrics["train/loss"])


@pytest.mark.parametrize("overrides,message", [
    (["module.importance_sampling_level=reply"], "module.importance_sampling_level must be one of"),
    (["module.loss_type=cispo"], "module.loss_type=cispo clips the importance weight at module.epsilon_high"),
])
def test_bad_settings_are_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(make_cfg("stage=grpo", *FAST, *overrides))
