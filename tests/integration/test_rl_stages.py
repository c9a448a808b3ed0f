"""PPO and GRPO on the tiny model: they train, log their statistics, export, and resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForSequenceClassification

from llm_stages.errors import ConfigError
from llm_stages.training.export import export_hf
from llm_stages.models import load_tokenizer
from llm_stages.train import build, train

FAST = ["rollout.generation.max_new_tokens=8", "datamodule.batch_size=4", "datamodule.val_batch_size=8",
        "trainer.limit_val_batches=1", "validate_before_fit=false"]
PPO = ["stage=ppo", "+rollout.rewards.equation={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.demo_equation, _partial_: true}}",
       "module.mini_batch_size=2", "module.ppo_epochs=2", *FAST]
GRPO = ["stage=grpo", "module.num_generations=4", "module.mini_batch_size=8", "module.ppo_epochs=2", *FAST]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    """An RM-stage-like export: a randomly initialised scalar-head Qwen2 with the tiny tokenizer."""
    tokenizer = load_tokenizer(OmegaConf.create({"name": "tiny"}))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return export_hf(Qwen2ForSequenceClassification(config), tokenizer, tmp_path_factory.mktemp("rm") / "export")


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_ppo_with_rule_reward_trains_actor_and_critic_and_exports(make_cfg):
    cfg = make_cfg(*PPO, "trainer.max_steps=8", "module.export_critic=true")  # 4 replies / 2 x 2 epochs = 4 steps per iteration
    module, _ = build(cfg)
    actor_before, critic_before = _params(module.model), _params(module.critic)
    reference_before = _params(module.reference)
    metrics = train(cfg)
    assert metrics["steps"] == 8
    assert "train/reward" in metrics and "train/loss" in metrics
    rollouts = [json.loads(line) for line in Path(metrics["output_dir"], "rollouts.jsonl").read_text().splitlines()]
    assert rollouts and set(rollouts[0]) == {"step", "prompt", "completion", "reward"}  # the sample table
    assert Path(metrics["export_dir"], "config.json").is_file() and Path(metrics["critic_export_dir"], "config.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(metrics["export_dir"])
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, actor_before[n])]
    assert changed, "PPO did not change the actor"
    assert module.reference is not None and all(torch.equal(p, reference_before[n]) for n, p in module.reference.named_parameters())
    assert critic_before  # the critic is built from the actor with a fresh value head
    assert any(n.startswith("score.") for n in critic_before)


def test_ppo_logs_every_statistic(make_cfg):
    cfg = make_cfg(*PPO, "trainer.max_steps=4")
    module, datamodule = build(cfg)
    seen = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    _fit(module, datamodule, cfg, [Capture()])
    for name in ["ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/clipfrac", "ppo/entropy",
                 "ppo/explained_variance", "ppo/kl", "env/reward_mean", "env/reward_std", "env/response_length",
                 "env/reward/equation", "rollout/logprob_diff_max", "rollout/logprob_diff_mean"]:
        assert name in seen and seen[name] == seen[name], name  # present and not NaN
    assert seen["rollout/logprob_diff_max"] < 1e-4  # sampling drew from the distribution the loss assumes


def test_ppo_with_reward_model_and_critic_from_it(make_cfg, reward_model_dir):
    cfg = make_cfg(*PPO, "~rollout.rewards", f"rollout.reward_model.path={reward_model_dir}",
                   f"module.critic_path={reward_model_dir}", "trainer.max_steps=4")
    module, _ = build(cfg)
    torch.testing.assert_close(module.critic.score.weight, module.reward_model.score.weight)  # critic starts from the RM
    metrics = train(cfg)
    assert metrics["steps"] == 4 and Path(metrics["export_dir"]).is_dir()


def test_rl_stage_needs_a_reward(make_cfg):
    with pytest.raises(ConfigError, match="needs a reward"):
        build(make_cfg(*PPO, "~rollout.rewards"))


@pytest.mark.parametrize("loss_type,beta", [("token_mean", 0.0), ("sequence_mean", 0.05)])
def test_grpo_trains(make_cfg, loss_type, beta):
    # A random model's replies hold a digit about half the time: rewards that vary within groups.
    digit = "{weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, _partial_: true, pattern: '.*[0-9].*'}}"
    cfg = make_cfg(*GRPO, f"module.loss_type={loss_type}", f"module.beta={beta}", "trainer.max_steps=4",
                   f"+rollout.rewards.digit={digit}")
    module, datamodule = build(cfg)
    assert (module.reference is None) == (beta == 0)  # no reference model held without a KL term
    before = _params(module.model)
    seen = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    _fit(module, datamodule, cfg, [Capture()])
    assert any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    for name in ["grpo/policy_loss", "grpo/clipfrac", "grpo/frac_reward_zero_std", "env/reward_mean",
                 "env/reward/correct", "env/reward/digit", "rollout/logprob_diff_max"] + (["grpo/kl"] if beta else []):
        assert name in seen, name
    assert seen["rollout/logprob_diff_max"] < 1e-4


def _fit(module, datamodule, cfg, callbacks, ckpt_path=None):
    trainer = L.Trainer(accelerator="cpu", max_steps=cfg.trainer.max_steps, logger=False, callbacks=callbacks,
                        default_root_dir=cfg.paths.output_dir, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


class Recorder(L.Callback):
    """Each iteration's statistics; optionally saves a checkpoint and stops after `stop_after` iterations."""

    def __init__(self, stop_after: int | None = None, path: Path | None = None, prefixes: tuple = ("ppo/", "env/")):
        self.rows, self.stop_after, self.path, self.prefixes = [], stop_after, path, prefixes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefixes)})
        if self.stop_after and len(self.rows) == self.stop_after:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_ppo_resume_gives_the_same_next_iteration(make_cfg, tmp_path):
    cfg = make_cfg(*PPO, "trainer.max_steps=12", "module.kl_target=1.0")  # 3 iterations; adaptive KL state too
    uninterrupted = Recorder()
    _fit(*build(cfg), cfg, [uninterrupted])

    stopped = Recorder(stop_after=2, path=tmp_path / "k2.ckpt")
    _fit(*build(cfg), cfg, [stopped])
    assert stopped.rows == uninterrupted.rows[:2]

    resumed = Recorder()
    module, datamodule = build(cfg)
    trainer = _fit(module, datamodule, cfg, [resumed], ckpt_path=tmp_path / "k2.ckpt")
    assert trainer.global_step == 12 and len(resumed.rows) == 1
    assert resumed.rows[0].keys() == uninterrupted.rows[2].keys()
    for key, value in uninterrupted.rows[2].items():
        assert resumed.rows[0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_a_malformed_reward_entry_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError, match="rollout.rewards.bad must be"):
        build(make_cfg(*PPO, "+rollout.rewards.bad={weight: 1.0}"))


def test_grpo_estimator_with_kl_in_reward_dynamic_sampling_and_overlong(make_cfg):
    """reinforce_pp_baseline with the KL in the reward (a reference held, beta 0), DAPO's dynamic
    sampling and overlong shaping: each logged, and the extra prompt batches counted as consumed, so a
    resumed run continues after them (the loader's position is that count)."""
    cfg = make_cfg(*GRPO, "module.advantage=reinforce_pp_baseline", "module.kl_coef=0.01", "module.dynamic_sampling=true",
                   "module.max_extra_rounds=2", "rollout.overlong_buffer=4", "trainer.max_steps=8")  # 2 iterations
    module, datamodule = build(cfg)
    assert module.reference is not None and module.beta == 0
    rows = []

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = _fit(module, datamodule, cfg, [Capture()])
    assert len(rows) == 2 and trainer.global_step == 8
    for row in rows:
        assert 0 <= row["rollout/kept_groups"] <= 4 and 0 <= row["rollout/extra_rounds"] <= 2
        assert row["rollout/extra_rounds"] == 2 or row["rollout/kept_groups"] == 4  # filled, or the cap was reached
        assert -1 <= row["env/reward/overlong"] <= 0 and "grpo/kl_in_reward" in row
    consumed = trainer.train_dataloader.batch_sampler.consumed
    assert consumed == len(rows) + sum(row["rollout/extra_rounds"] for row in rows)


def test_grpo_dynamic_sampling_resumes_exactly(make_cfg, tmp_path):
    """The prompt batches drawn for extra rounds count as consumed: a run resumed after iteration 2
    answers the same prompts in iteration 3 as an uninterrupted one (and ends at the same position)."""
    digit = "{weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, _partial_: true, pattern: '.*[0-9].*'}}"
    cfg = make_cfg(*GRPO, "module.dynamic_sampling=true", "module.max_extra_rounds=2", f"+rollout.rewards.digit={digit}",
                   "trainer.max_steps=12")  # 3 iterations

    class Prompts(Recorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.prompts = getattr(self, "prompts", []) + [batch[0].prompts]
            self.consumed = trainer.train_dataloader.batch_sampler.consumed
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    prefixes = ("grpo/", "env/", "rollout/kept", "rollout/dropped", "rollout/extra")
    uninterrupted = Prompts(prefixes=prefixes)
    _fit(*build(cfg), cfg, [uninterrupted])
    assert sum(row["rollout/extra_rounds"] for row in uninterrupted.rows) > 0  # the case worth testing
    stopped = Prompts(stop_after=2, path=tmp_path / "k2.ckpt", prefixes=prefixes)
    _fit(*build(cfg), cfg, [stopped])
    resumed = Prompts(prefixes=prefixes)
    _fit(*build(cfg), cfg, [resumed], ckpt_path=tmp_path / "k2.ckpt")
    assert resumed.prompts == uninterrupted.prompts[2:] and resumed.consumed == uninterrupted.consumed
    assert len(resumed.rows) == 1 and resumed.rows[0].keys() == uninterrupted.rows[2].keys()
    for key, value in uninterrupted.rows[2].items():
        assert resumed.rows[0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
