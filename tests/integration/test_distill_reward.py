"""On-policy distillation inside GRPO and PPO (`module.distill_coef`): each reply token's reward is
lowered by the policy's reverse KL to a frozen teacher at that token."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llm_stages.errors import ConfigError
from llm_stages.models import load_model, load_tokenizer
from llm_stages.train import build, train

FAST = ["trainer.max_steps=2", "datamodule.batch_size=2", "datamodule.val_batch_size=4", "trainer.limit_val_batches=1",
        "validate_before_fit=false", "rollout.generation.max_new_tokens=6"]
GRPO = ["stage=grpo", "module.num_generations=4", "module.mini_batch_size=8", "module.ppo_epochs=1", *FAST]
PPO = ["stage=ppo", "module.mini_batch_size=2", "module.ppo_epochs=1", *FAST,
       "+rollout.rewards.equation={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.demo_equation, _partial_: true}}"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    tokenizer = load_tokenizer(OmegaConf.create({"name": "tiny"}))
    torch.manual_seed(5)
    init = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1}
    model = load_model(OmegaConf.create({"name": "teacher", "init": init}), tokenizer)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_reverse_kl_is_student_minus_teacher_logprob_of_each_sampled_token(make_cfg, teacher_dir):
    module, datamodule = build(make_cfg(*GRPO, f"module.teacher.path={teacher_dir}", "module.distill_coef=0.5"))
    datamodule.setup("fit")
    prompts = next(iter(datamodule.train_dataloader()))[0]
    sample = module.rollout.sampler.sample(module.model, prompts, repeats=2, generation=module.generation, seed=0)
    reverse_kl = module.teacher_reverse_kl(sample)

    def logprobs(model):
        logits = model(input_ids=sample.input_ids, attention_mask=sample.attention_mask,
                       position_ids=(sample.attention_mask.cumsum(1) - 1).clamp(min=0)).logits
        width = sample.response.shape[1]
        logits = logits[:, -width - 1:-1].float() / module.generation["temperature"]
        return torch.log_softmax(logits, -1).gather(-1, sample.response.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        expected = (logprobs(module.model) - logprobs(module.teacher)) * sample.response_mask
    torch.testing.assert_close(reverse_kl, expected, rtol=1e-5, atol=1e-5)
    # The policy's log-probs the stage already holds (PPO's, GRPO's old ones) give the same numbers.
    held = module.response_logprobs(module.model, sample)[0].detach() * sample.response_mask
    torch.testing.assert_close(module.teacher_reverse_kl(sample, held), reverse_kl, rtol=0, atol=0)
    assert (reverse_kl[sample.response_mask == 0] == 0).all() and reverse_kl.abs().sum() > 0


def test_a_teacher_equal_to_the_policy_adds_nothing(make_cfg, tmp_path):
    module, _ = build(make_cfg(*GRPO))
    module.model.save_pretrained(tmp_path / "same")
    module.tokenizer.save_pretrained(tmp_path / "same")
    with_teacher, datamodule = build(make_cfg(*GRPO, f"module.teacher.path={tmp_path / 'same'}", "module.distill_coef=1.0"))
    datamodule.setup("fit")
    prompts = next(iter(datamodule.train_dataloader()))[0]
    sample = with_teacher.rollout.sampler.sample(with_teacher.model, prompts, repeats=2, generation=with_teacher.generation,
                                                seed=0)
    assert with_teacher.teacher_reverse_kl(sample).abs().max() < 1e-5


@pytest.mark.parametrize("overrides", [GRPO, PPO], ids=["grpo", "ppo"])
def test_rl_trains_with_the_distillation_reward(make_cfg, teacher_dir, overrides, monkeypatch):
    from llm_stages.stages.rl import RLStage

    seen, original = [], RLStage.teacher_reverse_kl
    monkeypatch.setattr(RLStage, "teacher_reverse_kl",
                        lambda self, *args: seen.append(original(self, *args)) or seen[-1])
    metrics = train(make_cfg(*overrides, f"module.teacher.path={teacher_dir}", "module.distill_coef=0.5"))
    assert metrics["steps"] >= 2 and math.isfinite(metrics["train/loss"])
    assert seen and all(kl.abs().sum() > 0 for kl in seen)  # once per iteration, a teacher unlike the policy


def test_distill_coef_without_a_teacher_is_one_line(make_cfg):
    with pytest.raises(ConfigError, match=r"module.distill_coef=0.5: .*module.teacher.path"):
        build(make_cfg(*GRPO, "module.distill_coef=0.5"))
